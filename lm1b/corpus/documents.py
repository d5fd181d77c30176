"""Documents of the embedded corpus: runs of grammar sentences that share a topic, mostly one
tense, a home place, and a cast of people and counted objects that keep coming back.

A document has MIN_DOCUMENT_SENTENCES..MAX_DOCUMENT_SENTENCES sentences (`document_lengths`
merges a shard's tail into its last document):

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

`plan_document` draws the cast and the opening facts and puts them on the agenda of the
sentences that must mention them; each sentence is drawn by the sentence grammar in a
`DocumentSentence` context, which hands the agenda's entities to the grammar's subject and
object slots and adds the ones they did not take as ", and" clauses. A rejected draw (too short
or too long) leaves the plan unchanged; the accepted one's mentions are committed to it.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

from lm1b.corpus import vocabulary as V
from lm1b.corpus.draws import Draws
from lm1b.corpus.sentences import Sentence, SentenceDraft, draw_sentence

MIN_DOCUMENT_SENTENCES = 20
MAX_DOCUMENT_SENTENCES = 200
MAX_GAP = 150  # sentences between two consecutive mentions of an entity, at most
_GAP_RANGES = ((1, 3), (4, 49), (50, MAX_GAP))  # short, medium, long: drawn a third each
_CLOSING = 3   # the last sentences of a document recall its opening facts
_MAX_RESERVED_NUMBERS = 40  # numbers of counted objects a document comes back to (of 98)


class Person(NamedTuple):
  """A member of a document's cast; `role` is the appositive ", a famous captain ,"."""
  first: str
  surname: str
  female: bool
  role: tuple[str, str]  # (adjective, agent noun)


class Count(NamedTuple):
  """Counted objects ("the 37 wooden barrels"), repeated verbatim whenever they come back."""
  number: str
  adjective: str
  noun: str  # plural


Entity = Person | Count


class Document(NamedTuple):
  """A drawn document: its sentences and the opening facts that its last sentences recall."""
  sentences: list[Sentence]
  founders: tuple[Person, ...]  # 1 or 2, introduced in sentences 0 and 1
  leads: tuple[Count, Count]    # the counts of sentences 0 and 1


@dataclasses.dataclass
class DocumentPlan:
  """The plan and the committed state of the document being written."""
  length: int
  topic: int
  past: bool
  place: str   # the home place, in about half of its place phrases
  year: str    # opens the first and the last sentence
  founders: tuple[Person, ...]
  leads: tuple[Count, Count]
  chained: set[Entity]  # entities whose every mention schedules the next one
  surnames: set[str]    # the cast's; nobody else in the document has them
  numbers: set[str]     # of the counts it comes back to; no other count or bracket uses them
  agenda: dict[int, list[Entity]] = dataclasses.field(default_factory=dict)  # sentence -> due
  last_mention: dict[Entity, int] = dataclasses.field(default_factory=dict)  # -> sentence

  def commit(self, sentence: "DocumentSentence") -> None:
    """Records the accepted draw of a sentence: its mentions, new counts and scheduled ones."""
    self.agenda.pop(sentence.index, None)
    for entity in sentence.mentioned:
      self.last_mention[entity] = sentence.index
    self.chained.update(sentence.new_chains)
    self.numbers.update(count.number for count in sentence.new_chains)
    for index, entity in sentence.scheduled:
      self.agenda.setdefault(index, []).append(entity)


def plan_document(draws: Draws, length: int) -> DocumentPlan:
  """Draws a document's topic, tense, place, year and cast, and its opening facts, which go on
  the agenda of sentences 0-1 and of the closing sentences; every other cast member goes on
  the agenda of a sentence in the first 70%."""
  topic = int(draws.uniform() * len(V.TOPICS))
  cast = _cast(draws, topic, 2 + length // 25)
  founders = tuple(cast[:1 + (draws.uniform() < 0.5)])
  first, second = draws.distinct(V.NUMBERS, 2)
  leads = tuple(Count(number, draws.pick(V.ADJECTIVES), draws.zipf(V.THINGS[topic][1]))
                for number in (first, second))
  past = draws.uniform() < 0.45
  place = draws.pick(V.PLACES[topic])
  year = draws.pick(V.YEARS)
  plan = DocumentPlan(length, topic, past, place, year, founders, leads, chained=set(),
                      surnames={p.surname for p in cast}, numbers={first, second})
  closing = length - _CLOSING
  due = [(0, founders[0]), (0, leads[0]), (1, founders[-1]), (1, leads[1]),
         (closing, founders[0]), (closing, leads[0]), (closing + 1, founders[-1]),
         (closing + 1, leads[1]), (length - 1, founders[0]), (length - 1, leads[0])]
  for person in cast[len(founders):]:
    plan.chained.add(person)
    due.append((1 + int(draws.uniform() * 0.7 * length), person))
  for index, entity in due:
    plan.agenda.setdefault(index, []).append(entity)
  return plan


def _cast(draws: Draws, topic: int, size: int) -> list[Person]:
  cast = []
  for surname in draws.distinct(V.SURNAMES, size):
    female = draws.uniform() < 0.5
    role = (draws.pick(V.ADJECTIVES), draws.zipf(V.AGENTS[topic][0]))
    cast.append(Person(draws.pick(V.FEMALE_NAMES if female else V.MALE_NAMES), surname, female,
                       role))
  return cast


class DocumentSentence:
  """The context (lm1b.corpus.context.Context) of one draw of sentence `index` of a document.

  The grammar's subject and object slots take the agenda's entities first; every mention of a
  chained entity (cast other than the founders, counts) schedules its next one. The draw only
  collects what it mentioned and scheduled; `DocumentPlan.commit` applies an accepted draw.
  """

  def __init__(self, plan: DocumentPlan, index: int):
    self.plan = plan
    self.index = index
    self.forced: list[Entity] = list(dict.fromkeys(plan.agenda.get(index, ())))  # still due
    self.mentioned: list[Entity] = []
    self.scheduled: list[tuple[int, Entity]] = []  # (sentence index, entity)
    self.new_chains: list[Count] = []  # counts introduced by this draw

  # -- the grammar's questions ------------------------------------------------------------------

  def tense_and_topic(self, draws: Draws) -> tuple[bool, int]:
    past = self.plan.past if draws.uniform() < 0.9 else not self.plan.past
    return past, self.plan.topic

  def dateline(self) -> str | None:
    return self.plan.year if self.index in (0, self.plan.length - 1) else None

  def home_place(self, draws: Draws) -> str | None:
    return self.plan.place if draws.uniform() < 0.5 else None

  def reserves(self, word: str) -> bool:
    return (word in self.plan.surnames or word in self.plan.numbers
            or any(count.number == word for count in self.new_chains))

  def take_subject(self, draft: SentenceDraft) -> bool:
    person = self._take(Person)
    if person is not None:
      self._mention(draft, person, subject=True)
    return person is not None

  def take_object(self, draft: SentenceDraft) -> bool:
    entity = self._take((Person, Count))
    if isinstance(entity, Person):
      self._mention(draft, entity, subject=False)
    elif entity is not None:
      self._counted(draft, entity)
    return entity is not None

  def take_count(self, draft: SentenceDraft, nouns: tuple[list[str], list[str]]) -> bool:
    if len(self.plan.numbers) + len(self.new_chains) >= _MAX_RESERVED_NUMBERS:
      return False
    count = Count(draft.number(), draft.draws.pick(V.ADJECTIVES), draft.draws.zipf(nouns[1]))
    self.new_chains.append(count)
    self._counted(draft, count)
    return True

  def finish(self, draft: SentenceDraft, depth: int) -> None:
    while self.forced:  # entities the sentence's own slots did not take
      draft.out += (",", "and")
      if isinstance(self.forced[0], Person):
        draft.clause(max(depth - 1, 0))
      else:
        self._counted(draft, self.forced.pop(0))
        draft.out += (draft.copula(True), draft.draws.pick(V.PREDICATE_ADJECTIVES))

  # -- entities ---------------------------------------------------------------------------------

  def _take(self, kind) -> Entity | None:
    """Removes and returns the first forced entity of type `kind`, or None."""
    for i, entity in enumerate(self.forced):
      if isinstance(entity, kind):
        return self.forced.pop(i)
    return None

  def _last_mention(self, entity: Entity) -> int | None:
    return self.index if entity in self.mentioned else self.plan.last_mention.get(entity)

  def _record(self, draws: Draws, entity: Entity) -> None:
    """Notes a mention and, for chained entities, schedules the next one."""
    self.mentioned.append(entity)
    if entity in self.plan.chained or entity in self.new_chains:
      gap = _gap(draws)
      if self.index + gap < self.plan.length - _CLOSING:
        self.scheduled.append((self.index + gap, entity))

  def _mention(self, draft: SentenceDraft, person: Person, subject: bool) -> None:
    """Appends `person` as a subject or object: the full name when introduced (founders with
    their role), else by the gap since the last mention: a pronoun or "Mr./Ms. Last" (<= 1),
    "Mr./Ms. Last" (<= 10; 80% up to 40), else the full name, beyond 40 mostly with the role."""
    draws, out = draft.draws, draft.out
    last = self._last_mention(person)
    gap = None if last is None else self.index - last
    u = draws.uniform()
    if gap is None:  # introduction; founders (not chained) always with their role
      out += (person.first, person.surname)
      if person not in self.plan.chained or draws.uniform() < 0.7:
        out += (",", V.article(person.role[0]), *person.role, ",")
    elif gap <= 1 and u < 0.6:
      out.append(("she" if subject else "her") if person.female else
                 ("he" if subject else "him"))
    elif gap <= 10 or (gap <= 40 and u >= 0.2):
      out += ("Ms." if person.female else "Mr.", person.surname)
    else:
      out += (person.first, person.surname)
      if gap > 40 and draws.uniform() < 0.7:
        out += (",", "the", *person.role, ",")
    draft.people.append((person.surname, "f" if person.female else "m"))
    self._record(draws, person)

  def _counted(self, draft: SentenceDraft, count: Count) -> None:
    draft.out += ("the", count.number, count.adjective, count.noun)
    if len(draft.numbers) < 2:
      draft.numbers.append((count.number, count.noun))
    self._record(draft.draws, count)


def _gap(draws: Draws) -> int:
  """Sentences to an entity's next mention: 1-3, 4-49 or 50-MAX_GAP (a third each), the last
  two log-uniform."""
  low, high = draws.pick(_GAP_RANGES)
  return int(low * math.exp(draws.uniform() * math.log((high + 1) / low)))


def draw_document(draws: Draws, length: int) -> Document:
  """A document of `length` sentences (see the module docstring)."""
  plan = plan_document(draws, length)
  sentences = []
  for index in range(length):
    sentence, context = draw_sentence(draws, functools.partial(DocumentSentence, plan, index))
    plan.commit(context)
    sentences.append(sentence)
  return Document(sentences, plan.founders, plan.leads)


def document_lengths(draws: Draws, count: int) -> list[int]:
  """Document lengths summing to `count`: uniform in MIN..MAX_DOCUMENT_SENTENCES, the tail
  merged into the last document (so a shard shorter than the minimum is one document)."""
  lengths = []
  remaining = count
  while remaining:
    length = MIN_DOCUMENT_SENTENCES + int(
        draws.uniform() * (MAX_DOCUMENT_SENTENCES - MIN_DOCUMENT_SENTENCES + 1))
    if remaining - length < MIN_DOCUMENT_SENTENCES:
      length = remaining
    lengths.append(length)
    remaining -= length
  return lengths


def draw_documents(seed: tuple[int, ...], count: int) -> tuple[list[list[str]], dict]:
  """`count` sentences (token lists) in documents, and {"documents": the documents' sentence
  counts} for the shard's statistics."""
  draws = Draws(seed)
  lengths = document_lengths(draws, count)
  sentences = [sentence.tokens for length in lengths
               for sentence in draw_document(draws, length).sentences]
  return sentences, {"documents": lengths}
