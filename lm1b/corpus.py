"""The embedded default corpus: a synthetic English-like language with long-range structure.

`ensure_embedded_corpus()` generates it deterministically on first use (a few seconds, one core)
and writes it in the official LM1B tarball layout, so the tarball source's code path is the one
that reads it:

  <root>/embedded_corpus_v1/training-monolingual.tokenized.shuffled/news.en-000NN-of-00100
      NN = 01..10, 30,000 sentences each (300,000 train sentences)
  <root>/embedded_corpus_v1/heldout-monolingual.tokenized.shuffled/news.en.heldout-000NN-of-00050
      NN = 00 (the test split) and 01, 5,000 sentences each
  <root>/embedded_corpus_v1/stats.json   (sentence/word/byte counts per file, grammar version)

One sentence per line, tokenized like LM1B: space-separated tokens, punctuation split off, the
first word capitalised. Each shard has its own seeded numpy generator, so the bytes are the same
on every machine. About 1,200 word types, 6.9M tokens, 35 MB.

The grammar (a stochastic, recursive phrase-structure grammar; depth and length are drawn per
sentence, sentences outside 5..120 tokens are redrawn):

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

Long-range dependencies a model can learn: subject-verb agreement across relative clauses,
prepositional phrases and brackets; one tense per sentence (present or past) for every verb;
brackets and quotes closed in nested order; numbers repeated verbatim (with the matching plural
noun) many words after they were introduced; people introduced by full name and later referred to
by a gender-consistent pronoun, possessive or "Mr./Ms. Surname"; `if ... , then`, `either ... or`;
a topic per sentence (farm, harbour, lab, ...) that biases every noun choice.
"""

import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from lm1b import paths

CORPUS_NAME = "embedded_corpus_v1"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
NUM_TRAIN_SHARDS = 10
TRAIN_SENTENCES_PER_SHARD = 30_000
NUM_HELDOUT_SHARDS = 2
HELDOUT_SENTENCES_PER_SHARD = 5_000
MIN_TOKENS = 5
MAX_TOKENS = 120
_SEED = 1_000_003
_RNG_BLOCK = 1 << 16


def train_shard_name(index: int) -> str:
  """LM1B training shard file name, index counted from 1."""
  return f"news.en-{index:05d}-of-00100"


def heldout_shard_name(index: int) -> str:
  """LM1B heldout shard file name, index counted from 0 (00000 is the test set)."""
  return f"news.en.heldout-{index:05d}-of-00050"


# ---------------------------------------------------------------------------------------------
# Vocabulary. Nouns are singular; plurals come from _plural(). Verbs: (base, third-singular, past).

_TOPICS = {
  "farm": (
    "farmer shepherd goat horse cow dog farmhand neighbour groom beekeeper rooster",
    "barn fence bucket tractor cart basket apple potato bale sack plough egg ladder",
    "field orchard meadow stable hill"),
  "harbour": (
    "sailor captain fisherman diver pilot dockworker gull smuggler merchant ferryman",
    "boat net anchor rope crate barrel lantern sail compass oar cargo hull",
    "harbour pier island lighthouse bay"),
  "lab": (
    "scientist chemist student engineer technician professor mouse rat volunteer inspector",
    "sample microscope flask machine report battery crystal sensor magnet engine formula",
    "laboratory basement workshop clinic tower"),
  "market": (
    "baker butcher customer trader seller tourist thief guard tailor cook",
    "loaf coin cheese melon scarf jar knife tomato candle carpet spice",
    "market square shop street bakery"),
  "school": (
    "teacher child pupil librarian principal poet painter musician actor coach",
    "book letter pencil desk map poem song painting drum chair notebook",
    "school library classroom theatre garden"),
  "city": (
    "mayor driver officer banker lawyer reporter nurse doctor clerk cyclist soldier",
    "bus train car bridge ticket newspaper bicycle clock umbrella statue lamp",
    "city station museum office hospital"),
  "forest": (
    "hunter ranger wolf fox bear owl stag traveller woodcutter hermit",
    "axe tree log cabin fire path stone branch leaf mushroom map",
    "forest valley river cave mountain"),
  "kingdom": (
    "king queen knight prince princess servant guard minister wizard messenger",
    "sword crown castle letter horse shield treasure throne banner key ring",
    "castle palace court village kingdom"),
}

_IRREGULAR_PLURALS = {
  "child": "children", "mouse": "mice", "knife": "knives", "leaf": "leaves", "wolf": "wolves",
  "potato": "potatoes", "tomato": "tomatoes", "cargo": "cargoes", "thief": "thieves",
  "loaf": "loaves",
}

_ADJECTIVES = (
  "old young small large tall short heavy light quiet loud busy lazy clever angry happy tired "
  "hungry careful nervous proud brave honest strange famous silent bright dark cold warm wet dry "
  "broken new ancient modern simple expensive cheap rare common empty full clean dirty green red "
  "blue yellow white black wooden golden distant nearby secret public local foreign ordinary "
  "curious gentle fierce patient polite rude slow fast rich poor sick healthy lucky calm").split()

_PREDICATE_ADJECTIVES = (  # fit people and things: "the 12 boxes were missing"
  "ready late early missing safe lost gone hidden famous fine quiet wet dry clean dirty cold warm "
  "busy alone new old different important visible expected unusual").split()

_ADVERBS = (
  "quickly slowly quietly loudly carefully suddenly finally again often rarely yesterday today "
  "early late together alone happily angrily patiently eagerly badly well twice secretly "
  "gladly openly").split()

_INTRANSITIVE = (
  "arrive wait laugh complain travel return disappear vote hesitate shout work rest agree "
  "celebrate smile cry dance listen pray argue knock whisper wander recover retire improve "
  "fail succeed").split() + [
  ("sleep", "sleeps", "slept"), ("leave", "leaves", "left"), ("run", "runs", "ran"),
  ("sing", "sings", "sang"), ("speak", "speaks", "spoke"), ("stop", "stops", "stopped"),
  ("swim", "swims", "swam"), ("fall", "falls", "fell"), ("win", "wins", "won"),
  ("lie", "lies", "lay"), ("sit", "sits", "sat"), ("stay", "stays", "stayed")]

_TRANSITIVE = (
  "carry repair paint count move open inspect describe order deliver clean borrow load "
  "collect protect follow watch visit notice measure examine destroy prepare polish guard "
  "sign return wash push pull").split() + [
  ("see", "sees", "saw"), ("build", "builds", "built"), ("sell", "sells", "sold"),
  ("buy", "buys", "bought"), ("find", "finds", "found"), ("hide", "hides", "hid"),
  ("lose", "loses", "lost"), ("hold", "holds", "held"), ("bring", "brings", "brought"),
  ("make", "makes", "made"), ("take", "takes", "took"), ("keep", "keeps", "kept"),
  ("feed", "feeds", "fed"), ("meet", "meets", "met"), ("catch", "catches", "caught"),
  ("steal", "steals", "stole"), ("break", "breaks", "broke"), ("choose", "chooses", "chose"),
  ("drop", "drops", "dropped"), ("forget", "forgets", "forgot"), ("throw", "throws", "threw"),
  ("write", "writes", "wrote"), ("draw", "draws", "drew"), ("bury", "buries", "buried")]

_SPEECH = (
  "claim announce suspect explain insist report believe argue remember").split() + [
  ("say", "says", "said"), ("think", "thinks", "thought"), ("feel", "feels", "felt"),
  ("admit", "admits", "admitted"),
  ("know", "knows", "knew"), ("hear", "hears", "heard"), ("write", "writes", "wrote")]

_FEMALE = (
  "Maria Anna Elena Sofia Laura Clara Irene Nadia Olga Rosa Julia Alice Hannah Greta Ines "
  "Yara Leila Mira Tessa Vera Ada Beatrice Carmen Dora Eva Fiona Gloria Helen Ivy Joan").split()
_MALE = (
  "Peter Omar Ivan Carlos Lucas Felix Tomas Hugo Samuel Victor Daniel Marco Anton Bruno Emil "
  "Karl Leon Max Nikolai Oscar Paul Rafael Simon Theo Walter Yusuf Arthur Boris Dmitri George"
  ).split()
_SURNAMES = (
  "Lopez Novak Berger Okafor Tanaka Silva Kowalski Haddad Moreau Jensen Rossi Petrov Costa Ibrahim "
  "Fischer Dubois Andersen Kim Nakamura Oliveira Schmidt Ferreira Meyer Larsen Romano Volkov Reyes "
  "Mendes Wagner Bauer Conti Lindqvist Nowak Sato Alvarez Demir Karim Marsh Holt Quinn Abbott "
  "Barros Castillo Duarte Eriksen Ford Grant Hale Ito Joshi Keller Lund Mori Nash Ortiz Pike "
  "Rhodes Stone Torres Ueda Vance Weiss Young Zeller").split()

_PREPOSITIONS = "near behind beside under above inside outside across from beyond".split()
_SUBORDINATORS = "because while although when after before if".split()
_TAILS = (", and", ", but", ", so", ", while", ", and then", "; meanwhile ,")


def _plural(noun: str) -> str:
  if noun in _IRREGULAR_PLURALS:
    return _IRREGULAR_PLURALS[noun]
  if noun.endswith(("s", "x", "z", "ch", "sh")):
    return noun + "es"
  if noun.endswith("y") and noun[-2] not in "aeiou":
    return noun[:-1] + "ies"
  return noun + "s"


def _verb_forms(verb) -> tuple[str, str, str]:
  """(base, third person singular present, past) for a regular base form or an explicit triple."""
  if isinstance(verb, tuple):
    return verb
  if verb.endswith(("s", "x", "z", "ch", "sh", "o")):
    third = verb + "es"
  elif verb.endswith("y") and verb[-2] not in "aeiou":
    third = verb[:-1] + "ies"
  else:
    third = verb + "s"
  if verb.endswith("e"):
    past = verb + "d"
  elif verb.endswith("y") and verb[-2] not in "aeiou":
    past = verb[:-1] + "ied"
  else:
    past = verb + "ed"
  return verb, third, past


def _article(word: str) -> str:
  return "an" if word[0] in "aeio" or word.startswith(("u", "hour", "honest")) else "a"


def _nouns(words: str) -> tuple[list[str], list[str]]:
  singular = words.split()
  return singular, [_plural(w) for w in singular]


_AGENTS = [_nouns(t[0]) for t in _TOPICS.values()]
_THINGS = [_nouns(t[1]) for t in _TOPICS.values()]
_PLACES = [t[2].split() for t in _TOPICS.values()]
_ALL_AGENTS = (sum((a[0] for a in _AGENTS), []), sum((a[1] for a in _AGENTS), []))
_ALL_THINGS = (sum((t[0] for t in _THINGS), []), sum((t[1] for t in _THINGS), []))
_INTRANS = [_verb_forms(v) for v in _INTRANSITIVE]
_TRANS = [_verb_forms(v) for v in _TRANSITIVE]
_SAYS = [_verb_forms(v) for v in _SPEECH]
_NUMBERS = [str(n) for n in range(2, 100)]
_YEARS = [str(y) for y in range(1950, 2020)]
_BRACKETS = (("(", ")"), ("[", "]"))


class _Generator:
  """Draws sentences (lists of tokens) from the grammar with a seeded numpy stream.

  Uniform floats are drawn from numpy in blocks and consumed in plain Python, which keeps the
  generator fast (about 10 microseconds a sentence) and bit-for-bit deterministic.
  """

  def __init__(self, seed: tuple[int, ...]):
    rng = np.random.default_rng(seed)

    def stream():
      while True:
        yield from rng.random(_RNG_BLOCK).tolist()

    self._u = stream().__next__  # () -> float in [0, 1)

  def _pick(self, items):
    return items[int(self._u() * len(items))]

  def _zipf(self, items):
    """Skewed choice: earlier items are more frequent (P(index < k) = sqrt(k / n))."""
    u = self._u()
    return items[int(u * u * len(items))]

  # -- sentence level ---------------------------------------------------------------------------

  def sentence(self) -> list[str]:
    while True:
      tokens = self._draw()
      if MIN_TOKENS <= len(tokens) <= MAX_TOKENS:
        return tokens

  def _draw(self) -> list[str]:
    self.out = []
    self.past = self._u() < 0.45
    self.topic = int(self._u() * len(_TOPICS))
    self.people: list[tuple[str, str]] = []   # (surname, gender "f"/"m")
    self.numbers: list[tuple[str, str]] = []  # (number, plural noun)
    self.brackets = 0
    u = self._u()
    depth = 0 if u < 0.25 else 1 if u < 0.6 else 2 if u < 0.85 else 3 if u < 0.96 else 4
    kind = self._u()
    if kind < 0.08:
      self._quote_first(depth)
    elif kind < 0.12:
      self.out.append("either")
      self._clause(depth)
      self.out += (",", "or")
      self._clause(depth)
    else:
      if kind < 0.35:
        self._opener(depth)
      self._clause(depth)
      while self._u() < 0.3 + 0.1 * depth and len(self.out) < 70:
        self.out += self._pick(_TAILS).split()
        self._clause(max(depth - 1, 0))
    self._echo_numbers()
    self.out.append(".")
    self._capitalise(0)
    return self.out

  def _capitalise(self, index: int) -> None:
    word = self.out[index]
    self.out[index] = word[0].upper() + word[1:]

  def _opener(self, depth: int) -> None:
    u = self._u()
    if u < 0.7:
      conj = self._pick(_SUBORDINATORS)
      self.out.append(conj)
      self._clause(max(depth - 1, 0))
      self.out.append(",")
      if conj == "if" and self._u() < 0.8:
        self.out.append("then")
    elif u < 0.85:
      self.out += ("in", self._pick(_YEARS), ",")
    else:
      self.out += ("according", "to")
      self._new_person(appositive=False)
      self.out.append(",")

  def _quote_first(self, depth: int) -> None:
    self.out.append('"')
    start = len(self.out)
    self._clause(depth)
    self._capitalise(start)
    self.out += (",", '"')
    plural = self._subject(0)
    self.out.append(self._verb(self._pick(_SAYS), plural))

  def _echo_numbers(self) -> None:
    for number, noun in self.numbers:
      u = self._u()
      if u < 0.35:
        self.out += (",", "and", "all", number, noun, "were" if self.past else "are",
                     self._pick(_PREDICATE_ADJECTIVES))
      elif u < 0.6 and number != "2":  # "only M of the N", 2 <= M < N
        self.out += (",", "but", "only", str(2 + int(self._u() * (int(number) - 2))), "of",
                     "the", number, "were" if self.past else "are",
                     self._pick(_PREDICATE_ADJECTIVES))
      elif u < 0.85:
        self.out += ("(", number, "in", "total", ")")

  # -- clauses ----------------------------------------------------------------------------------

  def _clause(self, depth: int) -> None:
    plural = self._subject(depth)
    self._verb_phrase(plural, depth)

  def _verb(self, forms: tuple[str, str, str], plural: bool) -> str:
    return forms[2] if self.past else forms[0] if plural else forms[1]

  def _copula(self, plural: bool) -> str:
    if self.past:
      return "were" if plural else "was"
    return "are" if plural else "is"

  def _verb_phrase(self, plural: bool, depth: int) -> None:
    u = self._u()
    out = self.out
    if u < 0.3:
      out.append(self._verb(self._zipf(_INTRANS), plural))
      if self._u() < 0.3:
        out.append(self._pick(_ADVERBS))
      if self._u() < 0.3:
        self._prep_phrase(depth)
    elif u < 0.66:
      out.append(self._verb(self._zipf(_TRANS), plural))
      self._object(depth)
      if self._u() < 0.2:
        self._prep_phrase(depth)
    elif u < 0.8 or depth == 0:
      out += (self._copula(plural), self._pick(_PREDICATE_ADJECTIVES))
    elif u < 0.92:
      out += (self._verb(self._zipf(_SAYS), plural), "that")
      self._clause(depth - 1)
    else:
      out += (self._verb(self._zipf(_SAYS), plural), ",", '"')
      start = len(out)
      self._clause(depth - 1)
      self._capitalise(start)
      out.append('"')

  # -- noun phrases -----------------------------------------------------------------------------

  def _subject(self, depth: int) -> bool:
    """Appends a subject noun phrase; returns whether it is plural."""
    u = self._u()
    if self.people and u < 0.3:
      self._known_person(subject=True)
      return False
    if u < 0.45:
      self._new_person(appositive=self._u() < 0.3)
      return False
    if u < 0.57 and len(self.numbers) < 2:
      self._numbered(self._agents())
      return True
    plural = self._u() < 0.4
    self._common(self._agents(), plural, depth, animate=True)
    return plural

  def _object(self, depth: int) -> None:
    u = self._u()
    if self.people and u < 0.2:
      self._known_person(subject=False)
    elif u < 0.35 and len(self.numbers) < 2:
      self._numbered(self._things())
    else:
      self._common(self._things(), self._u() < 0.4, depth, animate=False)

  def _agents(self):
    return _AGENTS[self.topic] if self._u() < 0.8 else _ALL_AGENTS

  def _things(self):
    return _THINGS[self.topic] if self._u() < 0.8 else _ALL_THINGS

  def _new_person(self, appositive: bool) -> None:
    female = self._u() < 0.5
    surname = self._pick(_SURNAMES)
    self.out += (self._pick(_FEMALE if female else _MALE), surname)
    self.people.append((surname, "f" if female else "m"))
    if appositive:
      adj, noun = self._pick(_ADJECTIVES), self._zipf(self._agents()[0])
      self.out += (",", _article(adj), adj, noun, ",")

  def _known_person(self, subject: bool) -> None:
    surname, gender = self._pick(self.people)
    if self._u() < 0.6:
      pronouns = ("she", "he") if subject else ("her", "him")
      self.out.append(pronouns[0] if gender == "f" else pronouns[1])
    else:
      self.out += ("Ms." if gender == "f" else "Mr.", surname)

  def _numbered(self, nouns) -> None:
    number, noun = self._pick(_NUMBERS), self._zipf(nouns[1])
    self.out += ("the", number, noun)
    self.numbers.append((number, noun))

  def _common(self, nouns, plural: bool, depth: int, animate: bool) -> None:
    """Det {Adj} Noun [modifier]; the modifier recurses with depth - 1."""
    index = int(self._u() ** 2 * len(nouns[0]))
    noun = nouns[1][index] if plural else nouns[0][index]
    adj = self._pick(_ADJECTIVES) if self._u() < 0.4 else None
    self.out += self._determiner(plural, adj or noun)
    if adj:
      self.out.append(adj)
    self.out.append(noun)
    if depth > 0:
      u = self._u()
      if u < 0.25:
        self._prep_phrase(depth - 1)
      elif u < 0.5:
        self._relative(plural, animate, depth - 1)
      elif u < 0.6:
        self._bracket(depth - 1)

  def _determiner(self, plural: bool, next_word: str) -> tuple[str, ...]:
    u = self._u()
    if self.people and u < 0.12:
      surname, gender = self._pick(self.people)
      return ("her" if gender == "f" else "his",)
    if u < 0.6:
      return ("the",)
    if plural:
      return (self._pick(("these", "some", "many", "several", "those", "few")),)
    return (self._pick((_article(next_word), "this", "every", "each", "that")),)

  def _prep_phrase(self, depth: int) -> None:
    self.out.append(self._pick(_PREPOSITIONS))
    if self._u() < 0.5:
      self.out += ("the", self._pick(_PLACES[self.topic]))
    else:
      self._common(self._things(), self._u() < 0.4, depth, animate=False)

  def _relative(self, plural: bool, animate: bool, depth: int) -> None:
    u = self._u()
    if u < 0.5:
      self.out.append("who" if animate else "that")
      self._verb_phrase(plural, depth)
    elif u < 0.8:
      self.out.append("that")
      inner = self._subject(depth)
      self.out.append(self._verb(self._zipf(_TRANS), inner))
    else:
      self.out += (",", "who" if animate else "which")
      self._verb_phrase(plural, depth)
      self.out.append(",")

  def _bracket(self, depth: int) -> None:
    opening, closing = _BRACKETS[self.brackets % 2]
    self.brackets += 1
    self.out.append(opening)
    u = self._u()
    if u < 0.35:
      self._clause(depth)
    elif u < 0.6:
      self.out += ("or", self._pick(_NUMBERS), "of", "them") if self._u() < 0.5 else (
        "in", self._pick(_YEARS))
    elif u < 0.8:
      self.out += ("as", self._pick(_SURNAMES), "noted")
      if self._u() < 0.6:
        self._bracket(depth)
    else:
      self.out += ("see", "the", self._pick(_ADJECTIVES), self._zipf(self._things()[0]))
      if self._u() < 0.5:
        self._bracket(depth)
    self.brackets -= 1
    self.out.append(closing)


# ---------------------------------------------------------------------------------------------


def _write_shard(path: pathlib.Path, seed: tuple[int, ...], count: int) -> dict:
  generator = _Generator(seed)
  sentences = [generator.sentence() for _ in range(count)]
  data = ("\n".join(map(" ".join, sentences)) + "\n").encode("utf-8")
  path.write_bytes(data)
  tokens = sum(map(len, sentences))
  return {"file": path.name, "sentences": count, "tokens": tokens, "bytes": len(data)}


def _shard_plan(scale: float) -> list[tuple[str, str, tuple[int, ...], int]]:
  """(subdir, file name, seed, sentence count) for every shard."""
  train = max(1, round(TRAIN_SENTENCES_PER_SHARD * scale))
  heldout = max(1, round(HELDOUT_SENTENCES_PER_SHARD * scale))
  plan = [(TRAIN_DIR, train_shard_name(i), (_SEED, 0, i), train)
          for i in range(1, NUM_TRAIN_SHARDS + 1)]
  plan += [(HELDOUT_DIR, heldout_shard_name(i), (_SEED, 1, i), heldout)
           for i in range(NUM_HELDOUT_SHARDS)]
  return plan


def _build(target: pathlib.Path, scale: float) -> dict:
  (target / TRAIN_DIR).mkdir()
  (target / HELDOUT_DIR).mkdir()
  start, cpu_start = time.perf_counter(), time.process_time()
  files = [_write_shard(target / sub / name, seed, count)
           for sub, name, seed, count in _shard_plan(scale)]
  stats = {"name": CORPUS_NAME, "scale": scale, "seed": _SEED, "files": files,
           "generation_seconds": round(time.perf_counter() - start, 2),
           "generation_cpu_seconds": round(time.process_time() - cpu_start, 2)}
  (target / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
  return stats


def ensure_embedded_corpus(root: pathlib.Path | None = None, *, scale: float = 1.0
                           ) -> pathlib.Path:
  """Returns the embedded corpus directory under `root` (default data_root()), building it once.

  `scale` multiplies every shard's sentence count (tests use small values); a corpus with
  scale != 1 lives in its own directory `embedded_corpus_v1_scale<scale>`. The corpus is built in
  a temporary directory beside the target and renamed into place, so readers never see a partial
  corpus and concurrent first uses are safe (the loser of the rename uses the winner's copy).
  """
  if not scale > 0:
    raise ValueError(f"ensure_embedded_corpus: scale must be > 0, got {scale!r}")
  root = pathlib.Path(root) if root is not None else paths.data_root()
  root.mkdir(parents=True, exist_ok=True)
  name = CORPUS_NAME if scale == 1.0 else f"{CORPUS_NAME}_scale{scale:g}"
  target = root / name
  if target.is_dir():
    return target
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
  try:
    _build(tmp, scale)
    tmp.chmod(0o755)  # mkdtemp creates 0700
    os.rename(tmp, target)
  except OSError:
    if not target.is_dir():
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target
