"""What a sentence is drawn in: the questions the sentence grammar asks beyond its own rules.

The grammar (lm1b.corpus.sentences) asks its `Context` at fixed points of every draw: which tense
and topic, whether a year opens the sentence, which place, whether a drawn surname or number is
taken, and whether the context has a subject, an object or a count of its own to place. An
`Independent` sentence answers with the grammar's own choices; a sentence of a document
(lm1b.corpus.documents.DocumentSentence) answers from its document's plan.
"""

from typing import TYPE_CHECKING, Protocol

from lm1b.corpus import vocabulary as V
from lm1b.corpus.draws import Draws

if TYPE_CHECKING:
  from lm1b.corpus.sentences import SentenceDraft


class Context(Protocol):
  """What a sentence is drawn in. The grammar asks it at fixed points of every draw; a hook
  that returns None / False leaves the choice to the grammar. One context serves one draw."""

  def tense_and_topic(self, draws: Draws) -> tuple[bool, int]:
    """(past tense?, topic index into vocabulary.TOPICS) of the sentence."""

  def dateline(self) -> str | None:
    """A year that opens the sentence ("In YEAR , ..."), or None."""

  def home_place(self, draws: Draws) -> str | None:
    """The place for a place phrase, or None for the topic's own draw."""

  def reserves(self, word: str) -> bool:
    """Whether a drawn surname or number is kept for the context's entities (then redrawn)."""

  def take_subject(self, draft: "SentenceDraft") -> bool:
    """Appends a singular subject of the context's own, if it has one to place."""

  def take_object(self, draft: "SentenceDraft") -> bool:
    """Appends an object of the context's own, if it has one to place."""

  def take_count(self, draft: "SentenceDraft", nouns: tuple[list[str], list[str]]) -> bool:
    """Appends a numbered noun phrase ("the 37 wooden barrels") of the context's own."""

  def finish(self, draft: "SentenceDraft", depth: int) -> None:
    """Appends what the context still has to place after the sentence's body."""


class Independent:
  """The context of an independent sentence: it draws its tense (45% past) and topic."""

  def tense_and_topic(self, draws: Draws) -> tuple[bool, int]:
    past = draws.uniform() < 0.45
    return past, int(draws.uniform() * len(V.TOPICS))

  def dateline(self) -> None:
    return None

  def home_place(self, draws: Draws) -> None:
    return None

  def reserves(self, word: str) -> bool:
    return False

  def take_subject(self, draft: "SentenceDraft") -> bool:
    return False

  def take_object(self, draft: "SentenceDraft") -> bool:
    return False

  def take_count(self, draft: "SentenceDraft", nouns) -> bool:
    return False

  def finish(self, draft: "SentenceDraft", depth: int) -> None:
    pass
