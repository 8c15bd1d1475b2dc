"""Tokenizer spec: fixed special ids, BOS..EOS PAD layout, truncation keeps EOS, round trips."""

import pickle

import numpy as np
import pytest

from coca_jax.data import tokenizer as tokenizer_lib
from coca_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
THINGS = ("dog", "cat", "bird", "boat", "house", "tree", "car", "horse")


def _captions(num: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} next to a {rng.choice(COLOURS)} "
          f"{rng.choice(THINGS)}" for _ in range(num)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("sp") / "captions_sp")
  return Tokenizer.train(_captions(300), prefix, vocab_size=60, model_type="bpe"), prefix


def test_special_ids_are_the_contract(trained):
  tok, _ = trained
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
  assert 4 < tok.vocab_size <= 60
  ids = tok.encode("a red dog next to a blue cat")
  assert ids and min(ids) > EOS_ID  # encode adds no specials


def test_tokenize_layout_and_round_trip(trained):
  tok, _ = trained
  captions = _captions(20, seed=1)
  max_len = 40
  text = tok.tokenize(captions, max_len)
  assert text.shape == (20, max_len) and text.dtype == np.int32
  for row, caption in zip(text, captions):
    pieces = tok.encode(caption)
    assert row[0] == BOS_ID
    np.testing.assert_array_equal(row[1:len(pieces) + 1], pieces)
    assert row[len(pieces) + 1] == EOS_ID
    assert (row[len(pieces) + 2:] == PAD_ID).all()
    assert tok.decode(row) == caption
  assert tok.num_truncated == 0


def test_truncation_keeps_eos_and_is_counted(trained):
  tok, _ = trained
  long_caption = " ".join(["a red dog next to a blue cat"] * 5)
  short_caption = "a cat"
  before = tok.num_truncated
  text = tok.tokenize([long_caption, short_caption, long_caption], max_len=8)
  assert tok.num_truncated - before == 2
  np.testing.assert_array_equal(text[0, 1:7], tok.encode(long_caption)[:6])
  assert text[0, 0] == BOS_ID and text[0, 7] == EOS_ID and text[2, 7] == EOS_ID
  assert EOS_ID in text[1] and text[1, -1] == PAD_ID
  with pytest.raises(ValueError, match="max_len"):
    tok.tokenize([short_caption], max_len=2)


def test_decode_stops_at_eos_and_skips_bos_pad(trained):
  tok, _ = trained
  pieces = tok.encode("a green horse")
  assert tok.decode([BOS_ID, *pieces, EOS_ID, *tok.encode("a cat"), PAD_ID]) == "a green horse"
  assert tok.decode(np.asarray([PAD_ID, BOS_ID, *pieces], np.int32)) == "a green horse"


def test_decode_reads_ids_past_the_trained_pieces_as_unk(trained):
  # A small corpus gives fewer pieces than the model's vocab_size (the limit is soft), and a
  # model can generate those ids: captioning must not crash on them.
  tok, _ = trained
  pieces = tok.encode("a green horse")
  text = tok.decode([BOS_ID, *pieces, tok.vocab_size, tok.vocab_size + 5, EOS_ID])
  assert text.startswith("a green horse") and text.count("\u2047") == 2  # UNK: " ⁇ "


def test_load_pickle_and_unknown_text(trained):
  tok, prefix = trained
  loaded = Tokenizer.load(prefix + ".model")
  caption = "a white boat next to a purple tree"
  assert loaded.encode(caption) == tok.encode(caption)
  restored = pickle.loads(pickle.dumps(loaded))  # grain workers receive it pickled
  assert restored.encode(caption) == tok.encode(caption)
  # A character never seen in training maps to UNK rather than failing.
  assert UNK_ID in tok.encode("a zebra")


def test_load_errors_name_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="coca_jax.data.tokenizer train"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="config.data.tokenizer"):
    Tokenizer.load("")
  # A model trained with SentencePiece's default ids (unk=0, bos=1, eos=2, pad off).
  import io
  import sentencepiece as spm
  stream = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_captions(100)), model_writer=stream,
                                 vocab_size=40, model_type="bpe", minloglevel=2)
  with pytest.raises(ValueError, match="retrain"):
    Tokenizer(stream.getvalue())


def test_cli_trains_from_captions_file(tmp_path, capsys):
  captions_file = tmp_path / "captions.txt"
  captions_file.write_text("\n".join(_captions(200)) + "\n", encoding="utf-8")
  tokenizer_lib.main(["train", "--captions_file", str(captions_file), "--vocab_size", "50",
                      "--model_type", "bpe", "--output", str(tmp_path / "cli_sp")])
  assert "wrote" in capsys.readouterr().out
  tok = Tokenizer.load(str(tmp_path / "cli_sp.model"))
  assert tok.decode(tok.tokenize(["a red dog"], 10)[0]) == "a red dog"
