"""Text files to sentences: one sentence per line, cleaned the same way for every source.

Lines are stripped; empty lines are skipped; invalid UTF-8 is replaced (U+FFFD); a line
longer than MAX_LINE_CHARS is split at whitespace. Reading is streamed, so a huge file or a
1 MB line keeps memory bounded.
"""

import dataclasses
import io
import logging
import pathlib
import re
from collections.abc import Iterable, Iterator

MAX_LINE_CHARS = 4096
CLEANING_VERSION = 1  # part of every source fingerprint: bump when clean_lines changes output
_READ_CHARS = 1 << 16
_WHITESPACE = re.compile(r"\s+")


@dataclasses.dataclass
class LineStats:
  """Counts of one cleaned stream (a file or a TFDS split)."""
  lines: int = 0
  sentences: int = 0
  empty: int = 0
  replaced: int = 0
  split: int = 0

  def log(self, label: str) -> None:
    message = ("%s: %d lines -> %d sentences; %d empty skipped, %d with invalid UTF-8 replaced, "
               "%d longer than %d chars split")
    # Clean files at DEBUG (LM1B has 150 of them); anything cleaned up is a WARNING.
    level = logging.WARNING if (self.empty or self.replaced or self.split) else logging.DEBUG
    logging.log(level, message, label, self.lines, self.sentences, self.empty, self.replaced,
                self.split, MAX_LINE_CHARS)


def _cut(text: str) -> tuple[int, int]:
  """(end of the first piece, start of the rest) for text longer than MAX_LINE_CHARS.

  Cuts at the last whitespace run within the first MAX_LINE_CHARS + 1 characters (searched in
  the reversed window), or hard at MAX_LINE_CHARS when there is none. text[0] is not whitespace.
  """
  window = text[1:MAX_LINE_CHARS + 1]
  match = _WHITESPACE.search(window[::-1])
  if match is None:
    return MAX_LINE_CHARS, MAX_LINE_CHARS
  return 1 + len(window) - match.end(), 1 + len(window) - match.start()


def clean_lines(chunks: Iterable[str], stats: LineStats) -> Iterator[str]:
  """Yields the sentences of decoded text given as chunks, updating `stats`.

  A chunk ending in "\\n" ends a line; chunks never contain "\\n" elsewhere (as produced by
  `TextIOWrapper.readline(size)`). Memory stays bounded by MAX_LINE_CHARS + one chunk whatever
  the line length.
  """
  pending, pieces, bad = "", 0, False
  for chunk in chunks:
    bad = bad or "\ufffd" in chunk
    pending = (pending + chunk) if pending else chunk.lstrip()
    while len(pending) > MAX_LINE_CHARS:
      end, resume = _cut(pending)
      yield pending[:end]
      pieces += 1
      pending = pending[resume:].lstrip()
    if chunk.endswith("\n"):
      yield from _finish_line(pending, pieces, bad, stats)
      pending, pieces, bad = "", 0, False
  if pending or pieces:
    yield from _finish_line(pending, pieces, bad, stats)


def _finish_line(rest: str, pieces: int, bad: bool, stats: LineStats) -> Iterator[str]:
  rest = rest.strip()
  if rest:
    pieces += 1
    yield rest
  stats.lines += 1
  stats.sentences += pieces
  stats.empty += pieces == 0
  stats.replaced += bad
  stats.split += pieces > 1


def _file_chunks(path: pathlib.Path) -> Iterator[str]:
  with open(path, "rb") as raw:
    text = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")
    while chunk := text.readline(_READ_CHARS):
      yield chunk


def read_file_sentences(path: pathlib.Path) -> Iterator[str]:
  """Cleaned sentences of one text file; logs the file's counts when it has been read."""
  stats = LineStats()
  yield from clean_lines(_file_chunks(path), stats)
  stats.log(str(path))
