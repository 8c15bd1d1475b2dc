"""The token ids every part agrees on: data writes them, models mask on them, losses skip them;
and what every tokenizer shares (text checks, decoding's id filter, pickling).

A leaf module (imports nothing) so that data, models and losses can share it without importing
each other. SentencePiece tokenizers are trained with exactly these ids; the CLIP BPE keeps
PAD_ID (its BOS/EOS are its own, read from the tokenizer).
"""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3


def check_texts(texts) -> None:
  """Raises a clear error for a text no tokenizer can encode: not a string, or not valid
  Unicode (a lone surrogate, e.g. from a file read with errors="surrogateescape"). The
  tokenizers' own errors ("List elements must be str", "Unable to cast ... to C++ type") name
  neither the text nor the cause."""
  for index, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"text {index} is a {type(text).__name__} ({text!r:.60}), not a string")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ValueError(
          f"text {index} ({text!a:.60}) is not valid Unicode: {e.reason} at position {e.start} "
          f"({text[e.start]!a}); remove the character, or decode the source as UTF-8 "
          "(a lone surrogate comes from text decoded with errors='surrogateescape')") from None


def text_ids(ids: list[int], bos_id: int, eos_id: int) -> list[int]:
  """The ids a decoder turns into text: those before the first `eos_id`, without `bos_id` and
  PAD_ID."""
  out = []
  for i in ids:
    if i == eos_id:
      break
    if i not in (bos_id, PAD_ID):
      out.append(i)
  return out


class PicklesAsSource:
  """Pickling for a tokenizer made by `cls(model_proto, source)` from bytes it keeps: grain
  worker processes receive it rebuilt from those bytes, with its truncation count."""

  def __getstate__(self):
    return {"model_proto": self.model_proto, "source": self.source,
            "num_truncated": self.num_truncated}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["source"])
    self.num_truncated = state["num_truncated"]
