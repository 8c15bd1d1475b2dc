r"""BERT's uncased WordPiece tokenizer (`config.data.tokenizer_kind='wordpiece'`), as VLMo uses
it (bert-base-uncased: 30,522 entries, [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103).

The tokenization is HF `tokenizers`' BertWordPieceTokenizer (BERT's normalizer: clean text,
split CJK characters, lowercase and strip accents; BERT's pre-tokenizer; greedy longest-match
WordPiece with '##' continuations), built from a vocabulary file of one entry per line (BERT's
vocab.txt; gzipped or not), `config.data.tokenizer`. The file travels with a run and a bundle
(TOKENIZER_FILES: vocab.txt), so a loaded model tokenizes as it was trained.

The batch contract (`Tokenizer.tokenize`): [CLS] pieces... [SEP] [PAD]..., a text cut to
max_len - 2 pieces so [SEP] is always there. BERT's [PAD] is 0, the project's PAD_ID, so masks
and losses treat it as padding; [CLS] and [SEP] play BOS and EOS (`bos_id`, `eos_id`), as
`config.model.text.bos_id / eos_id` must say (101 and 102 for bert-base-uncased).
"""

from __future__ import annotations

import gzip
from typing import Sequence

import numpy as np

from coca_jax.core import fs
from coca_jax.core.tokens import PAD_ID, PicklesAsSource, text_ids

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer(PicklesAsSource):
  """A BERT WordPiece vocabulary plus the batch contract. Picklable (holds the file's bytes),
  so grain worker processes can receive it."""

  def __init__(self, vocab_bytes: bytes, source: str = "<in memory>"):
    self.model_proto = vocab_bytes  # What a run and a bundle keep beside the config.
    self.source = source
    self.num_truncated = 0
    text = gzip.decompress(vocab_bytes) if vocab_bytes[:2] == b"\x1f\x8b" else vocab_bytes
    entries = text.decode("utf-8").split("\n")
    if entries and entries[-1] == "":
      entries.pop()
    self.vocab = {}
    for index, entry in enumerate(entries):
      self.vocab.setdefault(entry, index)
    missing = [s for s in SPECIALS if s not in self.vocab]
    if missing:
      raise ValueError(f"WordPiece vocabulary {source} lacks {missing}; give BERT's vocab.txt "
                       "(one entry per line, [PAD] first)")
    if self.vocab["[PAD]"] != PAD_ID:
      raise ValueError(f"WordPiece vocabulary {source} has [PAD] at {self.vocab['[PAD]']}, but "
                       f"coca_jax pads with {PAD_ID}; give a vocabulary with [PAD] first, as "
                       "BERT's")
    self.pad_id = PAD_ID
    self.unk_id, self.bos_id, self.eos_id, self.mask_id = (
        self.vocab[s] for s in ("[UNK]", "[CLS]", "[SEP]", "[MASK]"))
    self._size = len(entries)
    self._tokenizer = self._build()

  def _build(self):
    from tokenizers import BertWordPieceTokenizer  # A dependency of this tokenizer kind only.
    return BertWordPieceTokenizer(self.vocab, unk_token="[UNK]", sep_token="[SEP]",
                                  cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]",
                                  clean_text=True, handle_chinese_chars=True,
                                  strip_accents=None, lowercase=True)

  @classmethod
  def load(cls, path: str) -> "WordPieceTokenizer":
    """From a vocabulary file (BERT's vocab.txt, or gzipped)."""
    if not path:
      raise ValueError("config.data.tokenizer is empty; config.data.tokenizer_kind='wordpiece' "
                       "needs BERT's vocabulary file: set config.data.tokenizer (or --vocab) "
                       "to bert-base-uncased's vocab.txt")
    if not fs.exists(path):
      raise FileNotFoundError(f"WordPiece vocabulary {path!r} does not exist; give "
                              "bert-base-uncased's vocab.txt")
    return cls(fs.read_bytes(path), source=str(path))

  @property
  def vocab_size(self) -> int:
    return self._size

  def encode(self, text: str) -> list[int]:
    """WordPiece ids of `text`, without [CLS] and [SEP]."""
    return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`: skips [CLS] and [PAD], stops at the first [SEP], joins '##' pieces."""
    kept = text_ids(np.asarray(ids).reshape(-1).tolist(), self.bos_id, self.eos_id)
    out = [i if 0 <= i < self._size else self.unk_id for i in kept]
    return self._tokenizer.decode(out, skip_special_tokens=False)

  def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Batch "text" field: int32 [len(texts), max_len] = [CLS], pieces, [SEP], [PAD]...; a
    text with more than max_len - 2 pieces keeps the first max_len - 2 (counted in
    `num_truncated`)."""
    if max_len < 3:
      raise ValueError(f"max_len={max_len} leaves no room for a token between [CLS] and [SEP]; "
                       "config.model.text.max_len must be >= 3")
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    if not len(texts):
      return out
    keep = max_len - 2
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    for row, encoding in enumerate(encodings):
      ids = encoding.ids
      if len(ids) > keep:
        ids = ids[:keep]
        self.num_truncated += 1
      out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
    return out
