"""CLIP's byte-level BPE tokenizer (`config.data.tokenizer_kind = "clip_bpe"`), producing the
ids, start/end tokens and padding of open_clip's `tokenize` for its CoCa models.

It reads the merges file open_clip ships, `bpe_simple_vocab_16e6.txt.gz` (a path the user gives,
or the one inside an installed open_clip). Vocabulary: 256 byte symbols, the same with the
end-of-word marker '</w>', the first 48,894 merges, then <start_of_text> and <end_of_text>:
49,408 ids (a file with fewer merges gives 512 + merges + 2). Text is cleaned as open_clip does (ftfy, HTML unescaping twice, whitespace collapsed,
lower-cased). PAD is 0 (open_clip pads with 0, which is also the id of '!').

Batch layout (the same contract as `tokenizer.Tokenizer.tokenize`): int32 [N, max_len] =
sot, ids..., eot, 0...; a text longer than max_len - 2 ids keeps the first max_len - 2 and eot
(open_clip's truncation), counted in `num_truncated`.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from typing import Sequence

import numpy as np

from coca_jax.core import fs
from coca_jax.core.tokens import PAD_ID, check_texts, text_ids

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2


def installed_open_clip_file(name: str) -> str | None:
  """The file `name` inside an installed open_clip package (found without importing it: its
  __init__ imports torch), or None."""
  try:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], name)
  return path if os.path.exists(path) else None


def installed_vocab_file() -> str | None:
  """The merges file inside an installed open_clip, or None."""
  return installed_open_clip_file(VOCAB_FILE)


@functools.lru_cache()
def byte_symbols() -> dict[int, str]:
  """Byte -> printable unicode symbol: printable Latin-1 bytes stand for themselves, the others
  map to code points from 256 up, so no byte becomes whitespace or a control character."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


class ClipBpeTokenizer:
  """Same interface as `tokenizer.Tokenizer` (encode, decode, tokenize, vocab_size, specials)."""

  pad_id = PAD_ID
  unk_id = PAD_ID  # Byte-level: every text is representable, there is no unknown piece.

  def __init__(self, vocab_path: str):
    import regex  # Lazy: only this tokenizer needs them (both in install_requires).
    import ftfy
    self._ftfy = ftfy
    self.source = vocab_path
    self.num_truncated = 0
    self.model_proto = fs.read_bytes(vocab_path)  # What a bundle stores beside the config.
    lines = gzip.decompress(self.model_proto).decode("utf-8").split("\n")
    # CLIP's file has more lines than it uses; a shorter file (a prefix of it, as the tests
    # use) gives a smaller vocabulary with the same ids for what it has.
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
    if not merges or any(len(m) != 2 for m in merges):
      raise ValueError(f"{vocab_path} is not a CLIP BPE merges file ({VOCAB_FILE}): expected "
                       "a header line, then one 'a b' merge per line")
    symbols = list(byte_symbols().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<start_of_text>", "<end_of_text>"]
    self.encoder = {piece: i for i, piece in enumerate(vocab)}
    self.decoder = {i: piece for piece, i in self.encoder.items()}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.bos_id = self.encoder["<start_of_text>"]
    self.eos_id = self.encoder["<end_of_text>"]
    self._byte_decoder = {s: b for b, s in byte_symbols().items()}
    self._words = regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    self._cache: dict[str, list[str]] = {}

  @classmethod
  def load(cls, path: str = "") -> "ClipBpeTokenizer":
    path = path or installed_vocab_file() or ""
    if not path or not fs.exists(path):
      raise FileNotFoundError(
          f"CLIP BPE vocabulary {path or VOCAB_FILE!r} not found: set config.data.tokenizer to "
          f"open_clip's {VOCAB_FILE} (it ships inside the open_clip_torch package)")
    return cls(path)

  def __getstate__(self):
    return {"source": self.source, "num_truncated": self.num_truncated}

  def __setstate__(self, state):
    self.__init__(state["source"])
    self.num_truncated = state["num_truncated"]

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def _clean(self, text: str) -> str:
    text = html.unescape(html.unescape(self._ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()

  def _bpe(self, token: str) -> list[str]:
    if token in self._cache:
      return self._cache[token]
    word = [*token[:-1], token[-1] + "</w>"]
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word, word[1:])}
      best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[token] = word
    return word

  def encode(self, text: str) -> list[int]:
    """Ids of `text`, without sot/eot."""
    check_texts([text])
    symbols = byte_symbols()
    ids = []
    for token in self._words.findall(self._clean(text)):
      token = "".join(symbols[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[piece] for piece in self._bpe(token))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`: skips sot and PAD, stops at the first eot."""
    pieces = [self.decoder[i] for i in text_ids(np.asarray(ids).reshape(-1).tolist(),
                                                  self.bos_id, self.eos_id)]
    raw = bytearray(self._byte_decoder[c] for c in "".join(pieces))
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def tokenize(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """int32 [len(texts), max_len] = sot, ids, eot, 0... (see the module docstring)."""
    if max_len < 3:
      raise ValueError(f"max_len={max_len} leaves no room for a token between sot and eot")
    check_texts(texts)
    out = np.full((len(texts), max_len), PAD_ID, np.int32)
    for row, text in enumerate(texts):
      ids = self.encode(text)
      if len(ids) > max_len - 2:
        ids = ids[:max_len - 2]
        self.num_truncated += 1
      out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
    return out
