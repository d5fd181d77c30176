"""SentencePiece tokenizer: special ids, loading, and training on a sample of the train split.

The special token ids are defined here and nowhere else:
  PAD_ID = 0   (padding; never a target with nonzero weight)
  EOS_ID = 1   (end of sentence; the last target of every sentence)
  BOS_ID = 2   (beginning of sentence; the first input of every sentence)
  UNK_ID = 3
The trained model reserves exactly these ids (trainer flags pad_id/eos_id/bos_id/unk_id), so a
model file is self-describing and `Tokenizer` checks that it agrees.

Training sample: the first `sample_sentences` sentences of `source.sentences("train")`, streamed
to the trainer through `sentence_iterator` (no temporary text file). LM1B's training shards are
already shuffled, and the embedded corpus is generated i.i.d., so a prefix is an unbiased sample
and is deterministic: the same source gives the same tokenizer.
"""

import hashlib
import io
import logging
import os
import time
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from etils import epath

from lm1b import storage

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
SPECIAL_IDS = frozenset((PAD_ID, EOS_ID, BOS_ID))


class Tokenizer:
  """A loaded SentencePiece model; ids are Python ints, without BOS/EOS."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: epath.PathLike):
    self._sp = processor
    self.path = epath.Path(path)
    self.vocab_size = int(processor.get_piece_size())
    expected = {"pad_id": PAD_ID, "eos_id": EOS_ID, "bos_id": BOS_ID, "unk_id": UNK_ID}
    actual = {"pad_id": processor.pad_id(), "eos_id": processor.eos_id(),
              "bos_id": processor.bos_id(), "unk_id": processor.unk_id()}
    if actual != expected:
      raise ValueError(f"Tokenizer {self.path} has special ids {actual}, expected {expected}")

  def encode(self, text: str) -> list[int]:
    """Encodes one sentence to piece ids (no BOS/EOS)."""
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
    """Encodes many sentences with SentencePiece's own thread pool (default: all CPUs)."""
    threads = num_threads or os.cpu_count() or 1
    return self._sp.encode(list(texts), out_type=int, num_threads=threads)

  def decode(self, ids: Iterable[int]) -> str:
    """Decodes ids to text, dropping PAD/BOS/EOS (e.g. a padded model output row)."""
    return self._sp.decode([int(i) for i in ids if int(i) not in SPECIAL_IDS])

  def model_bytes(self) -> bytes:
    """The serialized model; token caches are keyed by its hash."""
    return self._sp.serialized_model_proto()

  def digest(self) -> str:
    """sha256 hex digest of the serialized model (what checkpoints record)."""
    return hashlib.sha256(self.model_bytes()).hexdigest()


def load_tokenizer(path: epath.PathLike) -> Tokenizer:
  """Loads a SentencePiece model file (local or gs://); a missing or corrupt file is a one-line
  error naming it."""
  path = epath.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Tokenizer model not found: {path}")
  processor = spm.SentencePieceProcessor()
  try:
    processor.load(model_proto=path.read_bytes())
  except (RuntimeError, OSError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"Corrupt tokenizer model {path}: {first_line}") from None
  return Tokenizer(processor, path)


def _sample(sentences: Iterator[str], limit: int, counter: list[int]) -> Iterator[str]:
  """Yields the first `limit` sentences, counting them in counter[0]."""
  for sentence in sentences:
    if counter[0] >= limit:
      return
    counter[0] += 1
    yield sentence


def train_tokenizer(path: epath.Path, sentences: Iterator[str], *, vocab_size: int,
                    sample_sentences: int, model_type: str, character_coverage: float,
                    byte_fallback: bool = False) -> None:
  """Trains a model on the first `sample_sentences` sentences and writes it atomically to path.

  With `byte_fallback`, a character outside the vocabulary is encoded as its UTF-8 bytes (256
  byte pieces are part of vocab_size) instead of <unk>, and digits are split one per piece, so
  no text reads as <unk>; without it (the default, and every shipped config), as SentencePiece's
  default.
  """
  counter = [0]
  proto = io.BytesIO()
  start = time.time()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sample(sentences, sample_sentences, counter), model_writer=proto,
        vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        input_sentence_size=sample_sentences, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2,
        byte_fallback=byte_fallback, split_digits=byte_fallback)
  except RuntimeError as e:
    message = " ".join(str(e).split())
    raise ValueError(f"SentencePiece training for {path} failed (vocab_size={vocab_size}, "
                     f"{counter[0]} sentences; a small corpus needs a smaller vocab_size): "
                     f"{message}") from None
  storage.write_bytes_atomic(path, proto.getvalue())
  logging.info("Trained %s tokenizer (vocab %d) on %d sentences in %.1f s -> %s", model_type,
               vocab_size, counter[0], time.time() - start, path)


def load_or_train_tokenizer(path: epath.PathLike, source, *, vocab_size: int = 8000,
                            sample_sentences: int = 1_000_000, model_type: str = "unigram",
                            character_coverage: float = 1.0,
                            byte_fallback: bool = False) -> Tokenizer:
  """The tokenizer model at `path` (a run's: lm1b.workdir.Workdir.tokenizer), trained first
  from `source`'s train split if absent.

  `byte_fallback` (for a new model): see `train_tokenizer`. An existing model is always reused
  (resume, eval, sampling), even if vocab_size differs; a mismatch is logged.
  """
  path = epath.Path(path)
  if not path.exists():
    logging.info("Training tokenizer from source %s (first %d train sentences)", source.name,
                 sample_sentences)
    train_tokenizer(path, source.sentences("train"), vocab_size=vocab_size,
                    sample_sentences=sample_sentences, model_type=model_type,
                    character_coverage=character_coverage, byte_fallback=byte_fallback)
  tokenizer = load_tokenizer(path)
  if tokenizer.vocab_size != vocab_size:
    logging.warning("Reusing %s with vocab %d (configured vocab_size=%d)", path,
                    tokenizer.vocab_size, vocab_size)
  return tokenizer
