"""The sentence grammar of the embedded corpus: a stochastic, recursive phrase-structure grammar.

Depth and length are drawn per sentence; sentences outside MIN_TOKENS..MAX_TOKENS tokens are
redrawn. Tokens are LM1B-like: punctuation split off, the first word capitalised.

  Sentence   -> [Opener ,] Clause {Tail} {NumberEcho} .
              | " Clause , " Speaker SpeechVerb .            (quote first, attribution last)
              | Either Clause , or Clause .
  Opener     -> because|while|although|when|after|before|if Clause     (`if` is usually answered
                by `then` at the start of the main clause) | In YEAR | According to Person
  Clause     -> Subject VerbPhrase
  Subject    -> Person (new: "First Last" [, a/an Adj Noun ,]; known: he/she, Mr./Ms. Last)
              | the NUMBER PluralNoun   (the number is remembered for an echo)
              | Det {Adj} Noun [PrepPhrase | RelClause | Bracket]
  VerbPhrase -> IntransitiveVerb [Adverb] [PrepPhrase]
              | TransitiveVerb Object [PrepPhrase]
              | is/are/was/were Adj
              | SpeechVerb that Clause
              | SpeechVerb , " Clause "
  RelClause  -> who/that VerbPhrase            (verb agrees with the modified noun)
              | that Subject TransitiveVerb    (verb agrees with the inner subject)
              | , which VerbPhrase ,
  Bracket    -> ( ... ) containing a clause, an aside, or a nested [ ... ] that itself may contain
                ( ... ): brackets alternate by depth and close in nested order
  Tail       -> , and|but|so|while Clause
  NumberEcho -> , and all NUMBER PluralNoun were Adj | , but only M of the NUMBER were Adj
              | ( NUMBER in total )                      (repeats a number introduced earlier)

A sentence is drawn in a `Context` (lm1b.corpus.context): an independent sentence draws its
own tense and topic; a sentence of a document (lm1b.corpus.documents) takes them from its
document and puts the document's people and counts into the grammar's subject and object slots.
"""

from collections.abc import Callable
from typing import NamedTuple

from lm1b.corpus import vocabulary as V
from lm1b.corpus.context import Context, Independent
from lm1b.corpus.draws import Draws

MIN_TOKENS = 5
MAX_TOKENS = 120
_BRACKETS = (("(", ")"), ("[", "]"))  # by nesting depth, alternating


class Clause(NamedTuple):
  """A clause of a sentence: where its subject starts, where its finite verb stands (token
  indices) and whether the subject is plural (the verb agrees with it)."""
  subject: int
  verb: int
  plural: bool


class Sentence(NamedTuple):
  """A drawn sentence: its tokens, its tense (every verb agrees with it) and its clauses."""
  tokens: list[str]
  past: bool
  clauses: list[Clause]


def draw_sentence(draws: Draws, new_context: Callable[[], Context] = Independent
                  ) -> tuple[Sentence, Context]:
  """A sentence of MIN_TOKENS..MAX_TOKENS tokens, each try in a fresh context from
  `new_context`; returns it with the context of its accepted draw."""
  while True:
    context = new_context()
    sentence = SentenceDraft(draws, context).build()
    if MIN_TOKENS <= len(sentence.tokens) <= MAX_TOKENS:
      return sentence, context


def draw_sentences(seed: tuple[int, ...], count: int) -> tuple[list[list[str]], dict]:
  """`count` independent grammar sentences (token lists), and no extra shard statistics."""
  draws = Draws(seed)
  return [draw_sentence(draws)[0].tokens for _ in range(count)], {}


class SentenceDraft:
  """One draw of the grammar: the tokens so far and the state that the rest of the sentence
  agrees with (tense, topic, the people and numbers it introduced, open brackets)."""

  def __init__(self, draws: Draws, context: Context):
    self.draws = draws
    self.context = context
    self.out: list[str] = []
    self.past, self.topic = context.tense_and_topic(draws)
    self.people: list[tuple[str, str]] = []   # (surname, gender "f"/"m")
    self.numbers: list[tuple[str, str]] = []  # (number, plural noun), at most 2, for echoes
    self.brackets = 0  # open brackets
    self.clauses: list[Clause] = []

  def build(self) -> Sentence:
    """Draws the whole sentence (its length unchecked)."""
    u = self.draws.uniform()
    depth = 0 if u < 0.25 else 1 if u < 0.6 else 2 if u < 0.85 else 3 if u < 0.96 else 4
    self._body(depth)
    self._echo_numbers()
    self.out.append(".")
    self._capitalise(0)
    return Sentence(self.out, self.past, self.clauses)

  # -- sentence level ---------------------------------------------------------------------------

  def _body(self, depth: int) -> None:
    year = self.context.dateline()
    if year is not None:
      self.out += ("in", year, ",")
      self._declarative(depth, opener=False)
    else:
      kind = self.draws.uniform()
      if kind < 0.08:
        self._quote_first(depth)
      elif kind < 0.12:
        self.out.append("either")
        self.clause(depth)
        self.out += (",", "or")
        self.clause(depth)
      else:
        self._declarative(depth, opener=kind < 0.35)
    self.context.finish(self, depth)

  def _declarative(self, depth: int, opener: bool) -> None:
    if opener:
      self._opener(depth)
    self.clause(depth)
    while self.draws.uniform() < 0.3 + 0.1 * depth and len(self.out) < 70:
      self.out += self.draws.pick(V.TAILS).split()
      self.clause(max(depth - 1, 0))

  def _capitalise(self, index: int) -> None:
    word = self.out[index]
    self.out[index] = word[0].upper() + word[1:]

  def _opener(self, depth: int) -> None:
    u = self.draws.uniform()
    if u < 0.7:
      conj = self.draws.pick(V.SUBORDINATORS)
      self.out.append(conj)
      self.clause(max(depth - 1, 0))
      self.out.append(",")
      if conj == "if" and self.draws.uniform() < 0.8:
        self.out.append("then")
    elif u < 0.85:
      self.out += ("in", self.draws.pick(V.YEARS), ",")
    else:
      self.out += ("according", "to")
      self._new_person(appositive=False)
      self.out.append(",")

  def _quote_first(self, depth: int) -> None:
    self.out.append('"')
    start = len(self.out)
    self.clause(depth)
    self._capitalise(start)
    self.out += (",", '"')
    plural = self._subject(0)
    self.out.append(self._verb(self.draws.pick(V.SPEECH_VERBS), plural))

  def _echo_numbers(self) -> None:
    for number, noun in self.numbers:
      u = self.draws.uniform()
      if u < 0.35:
        self.out += (",", "and", "all", number, noun, "were" if self.past else "are",
                     self.draws.pick(V.PREDICATE_ADJECTIVES))
      elif u < 0.6 and number != "2":  # "only M of the N", 2 <= M < N
        self.out += (",", "but", "only", str(2 + int(self.draws.uniform() * (int(number) - 2))),
                     "of", "the", number, "were" if self.past else "are",
                     self.draws.pick(V.PREDICATE_ADJECTIVES))
      elif u < 0.85:
        self.out += ("(", number, "in", "total", ")")

  # -- clauses ----------------------------------------------------------------------------------

  def clause(self, depth: int) -> None:
    """Appends Subject VerbPhrase."""
    start = len(self.out)
    plural = self._subject(depth)
    verb = len(self.out)
    self._verb_phrase(plural, depth)
    self.clauses.append(Clause(start, verb, plural))

  def _verb(self, forms: tuple[str, str, str], plural: bool) -> str:
    return forms[2] if self.past else forms[0] if plural else forms[1]

  def copula(self, plural: bool) -> str:
    """is / are / was / were, agreeing with the subject and the sentence's tense."""
    if self.past:
      return "were" if plural else "was"
    return "are" if plural else "is"

  def _verb_phrase(self, plural: bool, depth: int) -> None:
    u = self.draws.uniform()
    out = self.out
    if u < 0.3:
      out.append(self._verb(self.draws.zipf(V.INTRANSITIVE_VERBS), plural))
      if self.draws.uniform() < 0.3:
        out.append(self.draws.pick(V.ADVERBS))
      if self.draws.uniform() < 0.3:
        self._prep_phrase(depth)
    elif u < 0.66:
      out.append(self._verb(self.draws.zipf(V.TRANSITIVE_VERBS), plural))
      self._object(depth)
      if self.draws.uniform() < 0.2:
        self._prep_phrase(depth)
    elif u < 0.8 or depth == 0:
      out += (self.copula(plural), self.draws.pick(V.PREDICATE_ADJECTIVES))
    elif u < 0.92:
      out += (self._verb(self.draws.zipf(V.SPEECH_VERBS), plural), "that")
      self.clause(depth - 1)
    else:
      out += (self._verb(self.draws.zipf(V.SPEECH_VERBS), plural), ",", '"')
      start = len(out)
      self.clause(depth - 1)
      self._capitalise(start)
      out.append('"')

  # -- noun phrases -----------------------------------------------------------------------------

  def _subject(self, depth: int) -> bool:
    """Appends a subject noun phrase; returns whether it is plural."""
    if self.context.take_subject(self):
      return False
    u = self.draws.uniform()
    if self.people and u < 0.3:
      self._known_person(subject=True)
      return False
    if u < 0.45:
      self._new_person(appositive=self.draws.uniform() < 0.3)
      return False
    if u < 0.57 and len(self.numbers) < 2:
      self._numbered(self._agents())
      return True
    plural = self.draws.uniform() < 0.4
    self._common(self._agents(), plural, depth, animate=True)
    return plural

  def _object(self, depth: int) -> None:
    if self.context.take_object(self):
      return
    u = self.draws.uniform()
    if self.people and u < 0.2:
      self._known_person(subject=False)
    elif u < 0.35 and len(self.numbers) < 2:
      self._numbered(self._things())
    else:
      self._common(self._things(), self.draws.uniform() < 0.4, depth, animate=False)

  def _agents(self) -> tuple[list[str], list[str]]:
    return V.AGENTS[self.topic] if self.draws.uniform() < 0.8 else V.ALL_AGENTS

  def _things(self) -> tuple[list[str], list[str]]:
    return V.THINGS[self.topic] if self.draws.uniform() < 0.8 else V.ALL_THINGS

  def _new_person(self, appositive: bool) -> None:
    female = self.draws.uniform() < 0.5
    surname = self._surname()
    self.out += (self.draws.pick(V.FEMALE_NAMES if female else V.MALE_NAMES), surname)
    self.people.append((surname, "f" if female else "m"))
    if appositive:
      adj, noun = self.draws.pick(V.ADJECTIVES), self.draws.zipf(self._agents()[0])
      self.out += (",", V.article(adj), adj, noun, ",")

  def _known_person(self, subject: bool) -> None:
    surname, gender = self.draws.pick(self.people)
    if self.draws.uniform() < 0.6:
      pronouns = ("she", "he") if subject else ("her", "him")
      self.out.append(pronouns[0] if gender == "f" else pronouns[1])
    else:
      self.out += ("Ms." if gender == "f" else "Mr.", surname)

  def _surname(self) -> str:
    while self.context.reserves(surname := self.draws.pick(V.SURNAMES)):
      pass
    return surname

  def number(self) -> str:
    """A number 2..99 that the context does not reserve."""
    while self.context.reserves(number := self.draws.pick(V.NUMBERS)):
      pass
    return number

  def _numbered(self, nouns: tuple[list[str], list[str]]) -> None:
    if self.context.take_count(self, nouns):
      return
    number, noun = self.number(), self.draws.zipf(nouns[1])
    self.out += ("the", number, noun)
    self.numbers.append((number, noun))

  def _common(self, nouns, plural: bool, depth: int, animate: bool) -> None:
    """Det {Adj} Noun [modifier]; the modifier recurses with depth - 1."""
    index = int(self.draws.uniform() ** 2 * len(nouns[0]))
    noun = nouns[1][index] if plural else nouns[0][index]
    adj = self.draws.pick(V.ADJECTIVES) if self.draws.uniform() < 0.4 else None
    self.out += self._determiner(plural, adj or noun)
    if adj:
      self.out.append(adj)
    self.out.append(noun)
    if depth > 0:
      u = self.draws.uniform()
      if u < 0.25:
        self._prep_phrase(depth - 1)
      elif u < 0.5:
        self._relative(plural, animate, depth - 1)
      elif u < 0.6:
        self._bracket(depth - 1)

  def _determiner(self, plural: bool, next_word: str) -> tuple[str, ...]:
    u = self.draws.uniform()
    if self.people and u < 0.12:
      surname, gender = self.draws.pick(self.people)
      return ("her" if gender == "f" else "his",)
    if u < 0.6:
      return ("the",)
    if plural:
      return (self.draws.pick(("these", "some", "many", "several", "those", "few")),)
    return (self.draws.pick((V.article(next_word), "this", "every", "each", "that")),)

  def _prep_phrase(self, depth: int) -> None:
    self.out.append(self.draws.pick(V.PREPOSITIONS))
    if self.draws.uniform() < 0.5:
      self.out += ("the", self._place())
    else:
      self._common(self._things(), self.draws.uniform() < 0.4, depth, animate=False)

  def _place(self) -> str:
    place = self.context.home_place(self.draws)
    return place if place is not None else self.draws.pick(V.PLACES[self.topic])

  def _relative(self, plural: bool, animate: bool, depth: int) -> None:
    u = self.draws.uniform()
    if u < 0.5:
      self.out.append("who" if animate else "that")
      self._verb_phrase(plural, depth)
    elif u < 0.8:
      self.out.append("that")
      inner = self._subject(depth)
      self.out.append(self._verb(self.draws.zipf(V.TRANSITIVE_VERBS), inner))
    else:
      self.out += (",", "who" if animate else "which")
      self._verb_phrase(plural, depth)
      self.out.append(",")

  def _bracket(self, depth: int) -> None:
    opening, closing = _BRACKETS[self.brackets % 2]
    self.brackets += 1
    self.out.append(opening)
    u = self.draws.uniform()
    if u < 0.35:
      self.clause(depth)
    elif u < 0.6:
      self.out += ("or", self.number(), "of", "them") if self.draws.uniform() < 0.5 else (
        "in", self.draws.pick(V.YEARS))
    elif u < 0.8:
      self.out += ("as", self._surname(), "noted")
      if self.draws.uniform() < 0.6:
        self._bracket(depth)
    else:
      self.out += ("see", "the", self.draws.pick(V.ADJECTIVES),
                   self.draws.zipf(self._things()[0]))
      if self.draws.uniform() < 0.5:
        self._bracket(depth)
    self.brackets -= 1
    self.out.append(closing)
