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

`ensure_embedded_corpus(documents=True)` (gin: `make_source.kind = "embedded_documents"`) writes
the same layout under `embedded_documents_v1/` from its own seed, with 80% of the sentence
counts (24,000 per training shard, 4,000 per heldout shard: its sentences are longer, 29 tokens
against 23, so both corpora hold about 7.1M tokens, 35 MB), the sentences grouped into documents
(consecutive lines, no separators; stats.json lists every shard's document lengths): 20-200
sentences each (a shard's tail joins its last document), one topic, mostly one tense, a home
place, and entities that come back:

  opening    sentence 0 "In YEAR , First Last , a/an Adj Noun , ... the N Adj Nouns ...";
             sentence 1 a second founder (half of the documents) and a second count
  closing    the last 3 sentences recall those founders and counts ("First Last , the Adj
             Noun ," or "Mr./Ms. Last", and "the N Adj Nouns"), the last one opening
             "In YEAR ,"; between opening and closing they never occur (distance = document
             length)
  cast       2 + length / 25 people in all (distinct surnames that nobody else in the document
             has), the others introduced over the first 70% by full name (usually with a role)
  counts     the grammar's numbered noun phrases, up to 40 per document: "the 37 wooden
             barrels", with numbers that no other count or bracket in the document uses
  mentions   every mention of a cast member or count schedules its next one 1-3, 4-49 or
             50-150 sentences later (a third each); a person comes back as he/she/him/her
             (mentioned in this or the previous sentence), "Mr./Ms. Last", or "First Last"
             (always after more than 40 sentences, then mostly with ", the Adj Noun ,"); a count
             always verbatim, possibly followed by the sentence's echo (", and all 37 barrels
             were lost").

Sentences keep the grammar's rules (agreement, tense, brackets); entities that the grammar's
own subject and object slots do not take are added as ", and" clauses. Generation takes about
1.3 times the default corpus's CPU time. benchmarks/document_corpus.py measures how much caches
of the previous 64 / 1024 / 4096 tokens lower a bigram model's perplexity on it.
"""

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from lm1b import paths

CORPUS_NAME = "embedded_corpus_v1"
DOCUMENTS_NAME = "embedded_documents_v1"
TRAIN_DIR = "training-monolingual.tokenized.shuffled"
HELDOUT_DIR = "heldout-monolingual.tokenized.shuffled"
NUM_TRAIN_SHARDS = 10
TRAIN_SENTENCES_PER_SHARD = 30_000
NUM_HELDOUT_SHARDS = 2
HELDOUT_SENTENCES_PER_SHARD = 5_000
MIN_TOKENS = 5
MAX_TOKENS = 120
_SEED = 1_000_003
_DOCUMENTS_SEED = 2_000_003
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
    self._begin_sentence()
    u = self._u()
    depth = 0 if u < 0.25 else 1 if u < 0.6 else 2 if u < 0.85 else 3 if u < 0.96 else 4
    self._body(depth)
    self._echo_numbers()
    self.out.append(".")
    self._capitalise(0)
    return self.out

  def _begin_sentence(self) -> None:
    """Resets the per-sentence state: output, tense, topic, people, numbers, brackets."""
    self.out = []
    self.past = self._u() < 0.45
    self.topic = int(self._u() * len(_TOPICS))
    self.people: list[tuple[str, str]] = []   # (surname, gender "f"/"m")
    self.numbers: list[tuple[str, str]] = []  # (number, plural noun)
    self.brackets = 0

  def _body(self, depth: int) -> None:
    kind = self._u()
    if kind < 0.08:
      self._quote_first(depth)
    elif kind < 0.12:
      self.out.append("either")
      self._clause(depth)
      self.out += (",", "or")
      self._clause(depth)
    else:
      self._declarative(depth, opener=kind < 0.35)

  def _declarative(self, depth: int, opener: bool) -> None:
    if opener:
      self._opener(depth)
    self._clause(depth)
    while self._u() < 0.3 + 0.1 * depth and len(self.out) < 70:
      self.out += self._pick(_TAILS).split()
      self._clause(max(depth - 1, 0))

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
    surname = self._surname()
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

  def _surname(self) -> str:
    return self._pick(_SURNAMES)

  def _number(self) -> str:
    return self._pick(_NUMBERS)

  def _numbered(self, nouns) -> None:
    number, noun = self._number(), self._zipf(nouns[1])
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
      self.out += ("the", self._place())
    else:
      self._common(self._things(), self._u() < 0.4, depth, animate=False)

  def _place(self) -> str:
    return self._pick(_PLACES[self.topic])

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
      self.out += ("or", self._number(), "of", "them") if self._u() < 0.5 else (
        "in", self._pick(_YEARS))
    elif u < 0.8:
      self.out += ("as", self._surname(), "noted")
      if self._u() < 0.6:
        self._bracket(depth)
    else:
      self.out += ("see", "the", self._pick(_ADJECTIVES), self._zipf(self._things()[0]))
      if self._u() < 0.5:
        self._bracket(depth)
    self.brackets -= 1
    self.out.append(closing)


# ---------------------------------------------------------------------------------------------
# Documents: runs of related sentences sharing a topic, a tense, a home place, a cast of people
# and counted objects, each mentioned again after gaps of 1 to 150 sentences.

MIN_DOCUMENT_SENTENCES = 20
MAX_DOCUMENT_SENTENCES = 200
MAX_GAP = 150  # sentences between two consecutive mentions of an entity, at most
_GAP_RANGES = ((1, 3), (4, 49), (50, MAX_GAP))  # short, medium, long: drawn a third each
_CLOSING = 3   # the last sentences of a document recall its opening facts
_MAX_RESERVED_NUMBERS = 40  # numbers of counted objects a document comes back to (of 98)


class _Person(NamedTuple):
  """A member of a document's cast; `role` is the appositive ", a famous captain ,"."""
  first: str
  surname: str
  female: bool
  role: tuple[str, str]  # (adjective, agent noun)


class _Count(NamedTuple):
  """Counted objects ("the 37 wooden barrels"), repeated verbatim whenever they come back."""
  number: str
  adjective: str
  noun: str  # plural


@dataclasses.dataclass
class _Document:
  """The plan and the committed state of the document being written."""
  length: int
  topic: int
  past: bool
  place: str   # the home place, in about half of its place phrases
  year: str    # opens the first and the last sentence
  opening: tuple  # the founders (1 or 2 _Person) and the two _Count of sentences 0-1
  chained: set[object]  # entities whose every mention schedules the next one
  surnames: set[str]    # the cast's; nobody else in the document has them
  numbers: set[str]     # of the counts it comes back to; no other count or bracket uses them
  agenda: dict[int, list] = dataclasses.field(default_factory=dict)  # sentence -> entities
  last_mention: dict = dataclasses.field(default_factory=dict)  # entity -> sentence index


class _DocumentGenerator(_Generator):
  """Draws documents: grammar sentences that keep coming back to the same entities.

  The plan (`_plan`) puts the opening facts on the agenda of sentences 0-1 and of the closing
  sentences, and each other cast member on the agenda of a sentence in the first 70%; the
  grammar's subject and object slots take the agenda's entities first (`_subject`, `_object`).
  Every mention of a chained entity (cast other than the founders, counts) puts its next
  mention on the agenda. A draw never changes the document; an accepted sentence (MIN..MAX
  tokens) commits its mentions, new counts and scheduled mentions (`_commit`), so redrawing a
  rejected sentence is safe.
  """

  def document(self, length: int) -> list[list[str]]:
    self.doc = self._plan(length)
    sentences = []
    for index in range(length):
      self.index = index
      sentences.append(self.sentence())
      self._commit()
    return sentences

  def _plan(self, length: int) -> _Document:
    topic = int(self._u() * len(_TOPICS))
    cast = self._cast(topic, 2 + length // 25)
    founders = cast[:1 + (self._u() < 0.5)]
    first, second = self._distinct(_NUMBERS, 2)
    leads = [_Count(number, self._pick(_ADJECTIVES), self._zipf(_THINGS[topic][1]))
             for number in (first, second)]
    doc = _Document(length, topic, self._u() < 0.45, self._pick(_PLACES[topic]),
                    self._pick(_YEARS), (*founders, *leads), set(), {p.surname for p in cast},
                    {first, second})
    # Opening facts in sentences 0-1, recalled in the last _CLOSING sentences only.
    closing = length - _CLOSING
    plan = [(0, founders[0]), (0, leads[0]), (1, founders[-1]), (1, leads[1]),
            (closing, founders[0]), (closing, leads[0]), (closing + 1, founders[-1]),
            (closing + 1, leads[1]), (length - 1, founders[0]), (length - 1, leads[0])]
    for person in cast[len(founders):]:
      doc.chained.add(person)
      plan.append((1 + int(self._u() * 0.7 * length), person))
    for index, entity in plan:
      doc.agenda.setdefault(index, []).append(entity)
    return doc

  def _distinct(self, items: list[str], count: int) -> list[str]:
    chosen = []
    while len(chosen) < min(count, len(items)):
      item = self._pick(items)
      if item not in chosen:
        chosen.append(item)
    return chosen

  def _cast(self, topic: int, size: int) -> list[_Person]:
    cast = []
    for surname in self._distinct(_SURNAMES, size):
      female = self._u() < 0.5
      role = (self._pick(_ADJECTIVES), self._zipf(_AGENTS[topic][0]))
      cast.append(_Person(self._pick(_FEMALE if female else _MALE), surname, female, role))
    return cast

  def _commit(self) -> None:
    self.doc.agenda.pop(self.index, None)
    for entity in self.mentioned:
      self.doc.last_mention[entity] = self.index
    self.doc.chained.update(self.new_chains)
    self.doc.numbers.update(count.number for count in self.new_chains)
    for index, entity in self.scheduled:
      self.doc.agenda.setdefault(index, []).append(entity)

  # -- sentence level ---------------------------------------------------------------------------

  def _begin_sentence(self) -> None:
    doc = self.doc
    self.out = []
    self.past = doc.past if self._u() < 0.9 else not doc.past
    self.topic = doc.topic
    self.people = []
    self.numbers = []
    self.brackets = 0
    self.forced = list(dict.fromkeys(doc.agenda.get(self.index, ())))
    self.mentioned: list = []
    self.scheduled: list[tuple[int, object]] = []
    self.new_chains: list[_Count] = []

  def _body(self, depth: int) -> None:
    if self.index in (0, self.doc.length - 1):
      self.out += ("in", self.doc.year, ",")
      self._declarative(depth, opener=False)
    else:
      super()._body(depth)
    while self.forced:  # entities the sentence's own slots did not take
      self.out += (",", "and")
      if isinstance(self.forced[0], _Person):
        self._clause(max(depth - 1, 0))
      else:
        self._counted(self.forced.pop(0))
        self.out += (self._copula(True), self._pick(_PREDICATE_ADJECTIVES))

  def _take(self, kind) -> object | None:
    """Removes and returns the first forced entity of type `kind`, or None."""
    for i, entity in enumerate(self.forced):
      if isinstance(entity, kind):
        return self.forced.pop(i)
    return None

  def _subject(self, depth: int) -> bool:
    person = self._take(_Person)
    if person is None:
      return super()._subject(depth)
    self._mention(person, subject=True)
    return False

  def _object(self, depth: int) -> None:
    entity = self._take((_Person, _Count))
    if entity is None:
      super()._object(depth)
    elif isinstance(entity, _Person):
      self._mention(entity, subject=False)
    else:
      self._counted(entity)

  def _place(self) -> str:
    return self.doc.place if self._u() < 0.5 else super()._place()

  def _surname(self) -> str:
    while (surname := super()._surname()) in self.doc.surnames:
      pass
    return surname

  def _number(self) -> str:
    while self._reserved(number := super()._number()):
      pass
    return number

  def _reserved(self, number: str) -> bool:
    return number in self.doc.numbers or any(c.number == number for c in self.new_chains)

  # -- entities ---------------------------------------------------------------------------------

  def _last_mention(self, entity) -> int | None:
    return self.index if entity in self.mentioned else self.doc.last_mention.get(entity)

  def _record(self, entity) -> None:
    """Notes a mention and, for chained entities, schedules the next one."""
    self.mentioned.append(entity)
    if entity in self.doc.chained or entity in self.new_chains:
      gap = self._gap()
      if self.index + gap < self.doc.length - _CLOSING:
        self.scheduled.append((self.index + gap, entity))

  def _gap(self) -> int:
    """Sentences to an entity's next mention: 1-3, 4-40 or 41-MAX_GAP (a third each), the
    last two log-uniform."""
    low, high = self._pick(_GAP_RANGES)
    return int(low * math.exp(self._u() * math.log((high + 1) / low)))

  def _mention(self, person: _Person, subject: bool) -> None:
    """Appends `person` as a subject or object: the full name when introduced (founders with
    their role), else by the gap since the last mention: a pronoun or "Mr./Ms. Last" (<= 1),
    "Mr./Ms. Last" (<= 10; 80% up to 40), else the full name, beyond 40 mostly with the role."""
    last = self._last_mention(person)
    gap = None if last is None else self.index - last
    u = self._u()
    if gap is None:  # introduction; founders (not chained) always with their role
      self.out += (person.first, person.surname)
      if person not in self.doc.chained or self._u() < 0.7:
        self.out += (",", _article(person.role[0]), *person.role, ",")
    elif gap <= 1 and u < 0.6:
      self.out.append(("she" if subject else "her") if person.female else
                      ("he" if subject else "him"))
    elif gap <= 10 or (gap <= 40 and u >= 0.2):
      self.out += ("Ms." if person.female else "Mr.", person.surname)
    else:
      self.out += (person.first, person.surname)
      if gap > 40 and self._u() < 0.7:
        self.out += (",", "the", *person.role, ",")
    self.people.append((person.surname, "f" if person.female else "m"))
    self._record(person)

  def _counted(self, count: _Count) -> None:
    self.out += ("the", count.number, count.adjective, count.noun)
    if len(self.numbers) < 2:
      self.numbers.append((count.number, count.noun))
    self._record(count)

  def _numbered(self, nouns) -> None:
    if len(self.doc.numbers) + len(self.new_chains) < _MAX_RESERVED_NUMBERS:
      count = _Count(self._number(), self._pick(_ADJECTIVES), self._zipf(nouns[1]))
      self.new_chains.append(count)
      self._counted(count)
    else:
      super()._numbered(nouns)


def _document_lengths(u: Callable[[], float], count: int) -> list[int]:
  """Document lengths summing to `count`: uniform in MIN..MAX_DOCUMENT_SENTENCES, the tail
  merged into the last document (so a shard shorter than the minimum is one document)."""
  lengths = []
  remaining = count
  while remaining:
    length = MIN_DOCUMENT_SENTENCES + int(
        u() * (MAX_DOCUMENT_SENTENCES - MIN_DOCUMENT_SENTENCES + 1))
    if remaining - length < MIN_DOCUMENT_SENTENCES:
      length = remaining
    lengths.append(length)
    remaining -= length
  return lengths


# ---------------------------------------------------------------------------------------------


def draw_sentences(seed: tuple[int, ...], count: int) -> tuple[list[list[str]], dict]:
  """`count` independent grammar sentences (token lists), and no extra shard statistics."""
  generator = _Generator(seed)
  return [generator.sentence() for _ in range(count)], {}


def draw_documents(seed: tuple[int, ...], count: int) -> tuple[list[list[str]], dict]:
  """`count` sentences in documents, and {"documents": the documents' sentence counts}."""
  generator = _DocumentGenerator(seed)
  lengths = _document_lengths(generator._u, count)
  sentences = [sentence for length in lengths for sentence in generator.document(length)]
  return sentences, {"documents": lengths}


class _Variant(NamedTuple):
  """One embedded corpus: its directory name, seed, sentence drawer and the share of the
  default sentence counts it writes per shard."""
  name: str
  seed: int
  draw: Callable[[tuple[int, ...], int], tuple[list[list[str]], dict]]
  share: float


_SENTENCES = _Variant(CORPUS_NAME, _SEED, draw_sentences, 1.0)
# Document sentences are longer (29 tokens against 23): 80% of the sentences give both corpora
# about 7.1M tokens.
_DOCUMENTS = _Variant(DOCUMENTS_NAME, _DOCUMENTS_SEED, draw_documents, 0.8)


def _write_shard(path: pathlib.Path, variant: _Variant, seed: tuple[int, ...],
                 count: int) -> dict:
  sentences, extra = variant.draw(seed, count)
  data = ("\n".join(map(" ".join, sentences)) + "\n").encode("utf-8")
  path.write_bytes(data)
  tokens = sum(map(len, sentences))
  return {"file": path.name, "sentences": count, "tokens": tokens, "bytes": len(data), **extra}


def _shard_plan(scale: float, variant: _Variant) -> list[tuple[str, str, tuple[int, ...], int]]:
  """(subdir, file name, seed, sentence count) for every shard."""
  train = max(1, round(TRAIN_SENTENCES_PER_SHARD * scale * variant.share))
  heldout = max(1, round(HELDOUT_SENTENCES_PER_SHARD * scale * variant.share))
  plan = [(TRAIN_DIR, train_shard_name(i), (variant.seed, 0, i), train)
          for i in range(1, NUM_TRAIN_SHARDS + 1)]
  plan += [(HELDOUT_DIR, heldout_shard_name(i), (variant.seed, 1, i), heldout)
           for i in range(NUM_HELDOUT_SHARDS)]
  return plan


def _build(target: pathlib.Path, scale: float, variant: _Variant) -> dict:
  (target / TRAIN_DIR).mkdir()
  (target / HELDOUT_DIR).mkdir()
  start, cpu_start = time.perf_counter(), time.process_time()
  files = [_write_shard(target / sub / name, variant, seed, count)
           for sub, name, seed, count in _shard_plan(scale, variant)]
  stats = {"name": variant.name, "scale": scale, "seed": variant.seed, "files": files,
           "generation_seconds": round(time.perf_counter() - start, 2),
           "generation_cpu_seconds": round(time.process_time() - cpu_start, 2)}
  (target / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
  return stats


def ensure_embedded_corpus(root: pathlib.Path | None = None, *, scale: float = 1.0,
                           documents: bool = False) -> pathlib.Path:
  """Returns the embedded corpus directory under `root` (default data_root()), building it once.

  `scale` multiplies every shard's sentence count (tests use small values); a corpus with
  scale != 1 lives in its own directory `embedded_corpus_v1_scale<scale>`. documents=True gives
  the document corpus instead (`embedded_documents_v1[_scale<scale>]`). The corpus is built in
  a temporary directory beside the target and renamed into place, so readers never see a partial
  corpus and concurrent first uses are safe (the loser of the rename uses the winner's copy).
  """
  if not scale > 0:
    raise ValueError(f"ensure_embedded_corpus: scale must be > 0, got {scale!r}")
  root = pathlib.Path(root) if root is not None else paths.data_root()
  root.mkdir(parents=True, exist_ok=True)
  variant = _DOCUMENTS if documents else _SENTENCES
  name = variant.name if scale == 1.0 else f"{variant.name}_scale{scale:g}"
  target = root / name
  if target.is_dir():
    return target
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
  try:
    _build(tmp, scale, variant)
    tmp.chmod(0o755)  # mkdtemp creates 0700
    os.rename(tmp, target)
  except OSError:
    if not target.is_dir():
      raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return target
