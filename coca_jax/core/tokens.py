"""The token ids every part agrees on: data writes them, models mask on them, losses skip them.

A leaf module (imports nothing) so that data, models and losses can share it without importing
each other. SentencePiece tokenizers are trained with exactly these ids; the CLIP BPE keeps
PAD_ID (its BOS/EOS are its own, read from the tokenizer).
"""

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
