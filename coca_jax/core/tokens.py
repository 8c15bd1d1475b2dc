"""The token ids every part agrees on: data writes them, models mask on them, losses skip them.

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
