r"""SentencePiece tokenizer with the project's fixed special ids (pad=0, unk=1, bos=2, eos=3).

BOS/EOS/PAD are added in exactly one place, `Tokenizer.tokenize`, which produces the batch's
"text" field: int32 `[batch, max_len]` = BOS, pieces..., EOS, PAD... A caption with more than
`max_len - 2` pieces is cut so that EOS is always present, and counted in `num_truncated`.

Train a model offline from a built dataset's captions (no data is downloaded):

  python -m coca_jax.data.tokenizer train --data_dir ~/tensorflow_datasets --name digit_scenes \
      --vocab_size 64 --output /tmp/digit_scenes_sp

or from a text file with one caption per line (`--captions_file captions.txt`). This writes
`/tmp/digit_scenes_sp.model`; point `config.data.tokenizer` at it.
"""

from __future__ import annotations

import argparse
import io
from typing import Iterable, Sequence

from etils import epath
import numpy as np
import sentencepiece as spm

from coca_jax.core import cli
from coca_jax.core.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID  # Re-exported: the batch contract.
from coca_jax.core.tokens import PicklesAsSource, check_texts, text_ids
from coca_jax.data.clip_bpe import ClipBpeTokenizer
from coca_jax.data.wordpiece import WordPieceTokenizer


class Tokenizer(PicklesAsSource):
  """A SentencePiece model plus the BOS/EOS/PAD conventions of the batch contract.

  Picklable (holds the serialized model), so grain worker processes can receive it.
  """

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

  def __init__(self, model_proto: bytes, source: str = "<in memory>"):
    self.model_proto = model_proto
    self.source = source
    self.num_truncated = 0
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    specials = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
    if specials != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(
          f"SentencePiece model {source} has special ids (pad, unk, bos, eos)={specials}, but "
          f"coca_jax needs {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with "
          "`python -m coca_jax.data.tokenizer train`")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a `.model` file (local path or any path etils.epath understands)."""
    if not path:
      raise ValueError("config.data.tokenizer is empty; set it to a SentencePiece .model file "
                       "(train one with `python -m coca_jax.data.tokenizer train`)")
    model_path = epath.Path(path)
    if not model_path.exists():
      raise FileNotFoundError(f"tokenizer model {path!r} does not exist; train one with "
                              "`python -m coca_jax.data.tokenizer train`")
    return cls(model_path.read_bytes(), source=str(path))

  @classmethod
  def train(cls, captions: Iterable[str], model_prefix: str | None = None,
            vocab_size: int = 1000, model_type: str = "unigram",
            max_sentences: int = 2_000_000) -> "Tokenizer":
    """Trains a SentencePiece model on captions.

    Args:
      captions: caption strings (streamed; SentencePiece samples `max_sentences` of them).
      model_prefix: if given, writes `model_prefix + ".model"`.
      vocab_size: target size including the 4 specials. The limit is soft, so a small corpus
        (the demo's ~25 distinct words) yields a smaller vocabulary instead of an error.
      model_type: "unigram" (CoCa's choice) or "bpe".
      max_sentences: cap on the sentences SentencePiece loads (random sample beyond it).
    """
    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(c for c in captions if c), model_writer=stream,
        vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, character_coverage=1.0,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, minloglevel=2)
    proto = stream.getvalue()
    source = "<trained in memory>"
    if model_prefix:
      source = model_prefix + ".model"
      epath.Path(source).parent.mkdir(parents=True, exist_ok=True)
      epath.Path(source).write_bytes(proto)
    return cls(proto, source=source)

  def encode(self, text: str) -> list[int]:
    """Piece ids of `text`, without BOS/EOS."""
    check_texts([text])
    return list(self._sp.encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`: skips BOS and PAD, stops at the first EOS. An id past the trained
    pieces reads as UNK (shown as ' ⁇ '): the vocabulary size is a soft limit, so a model's
    `vocab_size` may exceed the pieces a small corpus gave, and it can generate those ids."""
    size = self._sp.get_piece_size()
    kept = text_ids(np.asarray(ids).reshape(-1).tolist(), BOS_ID, EOS_ID)
    return self._sp.decode([i if 0 <= i < size else UNK_ID for i in kept])

  def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Batch "text" field: int32 `[len(texts), max_len]` = BOS, pieces, EOS, PAD...

    A text with more than `max_len - 2` pieces keeps its first `max_len - 2` pieces and EOS;
    each such text adds one to `self.num_truncated`.
    """
    if max_len < 3:
      raise ValueError(f"max_len={max_len} leaves no room for a token between BOS and EOS; "
                       "config.model.text.max_len must be >= 3")
    check_texts(texts)
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    if not texts:
      return out
    keep = max_len - 2
    for row, ids in enumerate(self._sp.encode(list(texts))):
      if len(ids) > keep:
        ids = ids[:keep]
        self.num_truncated += 1
      out[row, 0] = BOS_ID
      out[row, 1:len(ids) + 1] = ids
      out[row, len(ids) + 1] = EOS_ID
    return out


# config.data.tokenizer_kind -> the file a workdir or bundle keeps beside config.json.
TOKENIZER_FILES = {"sentencepiece": "tokenizer.model", "clip_bpe": "bpe_simple_vocab_16e6.txt.gz",
                   "wordpiece": "vocab.txt"}


def load_tokenizer(path: str, kind: str = "sentencepiece"):
  """A `Tokenizer` (SentencePiece .model) or, for kind 'clip_bpe', a `clip_bpe.ClipBpeTokenizer`
  (open_clip's merges file; empty path: the one of an installed open_clip), or for kind
  'wordpiece' a `wordpiece.WordPieceTokenizer` (BERT's vocab.txt)."""
  if kind == "clip_bpe":
    return ClipBpeTokenizer.load(path)
  if kind == "wordpiece":
    return WordPieceTokenizer.load(path)
  if kind != "sentencepiece":
    raise ValueError(f"config.data.tokenizer_kind={kind!r} is unknown; use one of "
                     f"{sorted(TOKENIZER_FILES)}")
  return Tokenizer.load(path)


def _captions_from_dataset(name: str, data_dir: str, split: str) -> Iterable[str]:
  """Streams every caption of a built TFDS split (images are not decoded)."""
  from coca_jax.data import sources  # heavy: TFDS import is slow and unneeded for load().

  source = sources.open_source(name, data_dir, split, decode_images=False)
  for index in range(len(source)):
    for caption in source[index]["captions"]:
      yield caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m coca_jax.data.tokenizer",
                                   description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  train = commands.add_parser("train", help="train a SentencePiece model on captions")
  train.add_argument("--name", help="TFDS dataset name built by coca_jax.data.build")
  train.add_argument("--data_dir", help="TFDS data_dir holding --name")
  train.add_argument("--split", default="train")
  train.add_argument("--captions_file", help="alternative input: one caption per line (UTF-8)")
  train.add_argument("--vocab_size", type=int, default=32000)
  train.add_argument("--model_type", default="unigram", choices=("unigram", "bpe"))
  train.add_argument("--output", required=True, help="model prefix; writes OUTPUT.model")
  show = commands.add_parser("show", help="print the pieces and ids of some text")
  show.add_argument("--model", required=True)
  show.add_argument("text", nargs="+")
  args = parser.parse_args(argv)
  with cli.usage_errors(parser.prog, also=(ValueError,)):
    _main(parser, args)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.command == "show":
    tokenizer = Tokenizer.load(args.model)
    for text in args.text:
      ids = tokenizer.encode(text)
      print(f"{text!r} -> {ids} -> {tokenizer._sp.id_to_piece(ids)} -> {tokenizer.decode(ids)!r}")  # pylint: disable=protected-access
    return

  if bool(args.captions_file) == bool(args.name):
    parser.error("give either --captions_file or --name (with --data_dir)")
  if args.captions_file:
    captions = [line.strip() for line in
                epath.Path(args.captions_file).read_text(encoding="utf-8").splitlines()]
  else:
    if not args.data_dir:
      parser.error("--name needs --data_dir")
    captions = list(_captions_from_dataset(args.name, args.data_dir, args.split))
  tokenizer = Tokenizer.train(captions, args.output, args.vocab_size, args.model_type)
  print(f"trained on {len(captions)} captions: vocab_size={tokenizer.vocab_size}, "
        f"wrote {tokenizer.source}")


if __name__ == "__main__":
  main()
