r"""Builds the open_clip reference fixtures the CoCa interop tests compare against.

Runs in a Python with torch + open_clip_torch (NOT the project's environment), and calls the
project's own Python (--jax_python) for our side:

  python tests/data/make_open_clip_fixtures.py --jax_python .venv/bin/python          # tests/data
  python tests/data/make_open_clip_fixtures.py --jax_python .venv/bin/python \
      --model coca_ViT-B-32 --out /tmp/b32_check                                      # report only

With the default --model (tests/data/open_clip_tiny_coca.json, a tiny CoCa over a 64-merge
prefix of CLIP's BPE vocabulary) it writes into tests/data:
  open_clip_tiny_coca.safetensors   the random open_clip state dict (every parameter perturbed,
                                    so zero biases and unit LayerNorm scales are exercised too);
  open_clip_tiny_coca_outputs.npz   inputs and open_clip's outputs: image/text features, caption
                                    logits, greedy captions (sot/pad never chosen, as ours);
  clip_bpe_tiny.txt.gz              the header + first 64 merges of bpe_simple_vocab_16e6.txt.gz
                                    (OpenAI CLIP, MIT licence), so tests run without open_clip;
  clip_bpe_reference.json           open_clip's ids for tricky strings, with the tiny and the
                                    full vocabulary.
Then it checks, in both runs: our import reproduces open_clip's outputs (max abs differences
printed), and open_clip's load_state_dict(strict=True) accepts our export and gives the same
outputs again.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TINY_JSON = os.path.join(HERE, "open_clip_tiny_coca.json")
TINY_MERGES = 64
TRICKY = [
    "a photo of a cat.", "", "   extra   spaces\tand\nnewlines  ", "Hello, World!!! 123 4567",
    "naïve café — déjà vu", "emoji 🐈‍⬛🚀 and 👍🏽", "日本語のテキスト 中文", "it's we'll they'd I'M",
    "&amp; html &lt;b&gt; entities", "long " * 40 + "end", "mojibake: Ã©t Ã©", "ÅNGSTRÖM Σίσυφος",
]


def torch_outputs(model, images, texts, max_new, sot, eot, pad=0):
  import torch
  with torch.no_grad():
    out = model(torch.from_numpy(images), torch.from_numpy(texts))
    batch = images.shape[0]
    tokens = np.full((batch, max_new + 1), pad, np.int64)
    tokens[:, 0] = sot
    done = np.zeros(batch, bool)
    image_latent, image_embs = model._encode_image(torch.from_numpy(images))
    for i in range(max_new):
      prefix = torch.from_numpy(tokens[:, :i + 1])
      _, token_embs = model._encode_text(prefix)
      logits = model.text_decoder(image_embs, token_embs)[:, -1].numpy().copy()
      logits[:, [sot, pad]] = -np.inf  # Never chosen, as in our generate.allowed_logits.
      nxt = np.where(done, pad, logits.argmax(-1))
      tokens[:, i + 1] = nxt
      done |= nxt == eot
      if done.all():
        break
  return {"image_features": out["image_features"].numpy(),
          "text_features": out["text_features"].numpy(), "logits": out["logits"].numpy(),
          "greedy": tokens}


def perturb(model, seed):
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    # open_clip leaves the decoder's vocab projection uninitialised (torch.empty).
    proj = model.text_decoder.text_projection
    proj.copy_(proj.shape[0] ** -0.5 * torch.randn(proj.shape, generator=g))
    for name, p in model.named_parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
      if name == "logit_scale":
        p.fill_(3.0)


def jax_side(args):
  """Runs in the project's environment: import, our outputs, export (see main)."""
  sys.path.insert(0, REPO)
  import jax.numpy as jnp
  from coca_jax.core import schema
  from coca_jax.inference import generate
  from coca_jax.interop import open_clip, params as flat_params
  from coca_jax.training import step
  data = np.load(os.path.join(args.work, "inputs.npz"))
  from coca_jax.core import config as config_lib
  config = config_lib.complete(open_clip.base_config(args.model))
  params = open_clip.import_params(open_clip.read_state_dict(os.path.join(args.work, "oc.safetensors")), config)
  model = step.build_model(config)
  images = jnp.asarray(data["images"].transpose(0, 2, 3, 1))
  text = np.concatenate([data["texts"], np.zeros((len(data["texts"]), 1), np.int64)], 1)
  out = model.apply({"params": params}, images, jnp.asarray(text, jnp.int32))
  greedy = generate.generate(model, params, images, generate.Decoding(method="greedy"))
  np.savez(os.path.join(args.work, "ours.npz"), image_features=np.asarray(out["image_embed"]),
           text_features=np.asarray(out["text_embed"]),
           logits=np.asarray(out["caption_logits"]), greedy=np.asarray(greedy["tokens"]))
  model_config = schema.build(schema.CoCa, config.model)
  state = open_clip.to_open_clip(flat_params.flatten(model_config, params), model_config)
  open_clip.write_safetensors(state, os.path.join(args.work, "exported.safetensors"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default=TINY_JSON)
  parser.add_argument("--out", default=HERE)
  parser.add_argument("--jax_python", default=sys.executable)
  parser.add_argument("--side", default="torch", choices=("torch", "jax"))
  parser.add_argument("--work", default="")
  parser.add_argument("--batch", type=int, default=3)
  args = parser.parse_args()
  if args.side == "jax":
    return jax_side(args)

  import open_clip
  import safetensors.torch
  import torch
  torch.manual_seed(0)
  if os.path.exists(args.model):
    with open(args.model) as f:
      oc_config = json.load(f)
  else:
    oc_config = open_clip.get_model_config(args.model)
  tiny = os.path.abspath(args.model) == TINY_JSON
  os.makedirs(args.out, exist_ok=True)
  tokenizer_info = {}
  full_vocab = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
  if tiny:  # The tiny vocabulary, and open_clip's ids for the tricky strings.
    with gzip.open(full_vocab, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    tiny_vocab = os.path.join(args.out, "clip_bpe_tiny.txt.gz")
    with gzip.GzipFile(tiny_vocab, "wb", mtime=0) as f:  # No trailing newline: see clip_bpe.py.
      f.write("\n".join(lines[:TINY_MERGES + 1]).encode("utf-8"))
    from open_clip.tokenizer import SimpleTokenizer
    for name, path in (("tiny", tiny_vocab), ("full", full_vocab)):
      tok = SimpleTokenizer(bpe_path=path)
      tokenizer_info[name] = {
          "vocab_size": len(tok.encoder),
          "ids": [tok.encode(s) for s in TRICKY],
          "batch_20": tok(TRICKY, context_length=20).tolist()}
    tokenizer_info["strings"] = TRICKY
    with open(os.path.join(args.out, "clip_bpe_reference.json"), "w") as f:
      json.dump(tokenizer_info, f, ensure_ascii=False)
    assert tokenizer_info["tiny"]["vocab_size"] == oc_config["text_cfg"]["vocab_size"]

  model = open_clip.CoCa(**{k: v for k, v in oc_config.items() if k != "custom_text"}).eval()
  perturb(model, seed=0)
  vocab = oc_config["text_cfg"]["vocab_size"]
  sot, eot = vocab - 2, vocab - 1
  context = oc_config["text_cfg"]["context_length"]
  size = oc_config["vision_cfg"]["image_size"]
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, 3, size, size)).astype(np.float32)
  texts = np.zeros((args.batch, context), np.int64)
  for row, n in enumerate([context - 2, 3, context // 2][:args.batch]):
    texts[row, :n + 2] = [sot, *rng.integers(1, vocab - 2, n), eot]
  ref = torch_outputs(model, images, texts, context, sot, eot)

  work = tempfile.mkdtemp(prefix="oc_fixture_")
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  safetensors.torch.save_file(state, os.path.join(work, "oc.safetensors"))
  np.savez(os.path.join(work, "inputs.npz"), images=images, texts=texts)
  subprocess.run([args.jax_python, os.path.abspath(__file__), "--side", "jax", "--work", work,
                  "--model", args.model], check=True, cwd=REPO)
  ours = dict(np.load(os.path.join(work, "ours.npz")))
  report = {}
  for key in ("image_features", "text_features", "logits"):
    want = ref[key] / (np.linalg.norm(ref[key], axis=-1, keepdims=True) if key != "logits" else 1)
    diff = np.abs(ours[key][:, :want.shape[1]] - want)
    if key == "logits":
      # Positions whose input is a real token (open_clip's decoder attends to pad positions
      # too, ours masks them; pad positions carry no loss). Our decoder also predicts from the
      # last input, whose label is always a pad; open_clip drops that position.
      diff = diff[texts[:, :want.shape[1]] != 0]
    report[key] = float(diff.max())
  report["greedy_identical"] = bool((ours["greedy"] == ref["greedy"]).all())
  # Our export loads into open_clip (strict) and gives the same outputs.
  reloaded = open_clip.CoCa(**{k: v for k, v in oc_config.items() if k != "custom_text"}).eval()
  reloaded.load_state_dict(safetensors.torch.load_file(os.path.join(work, "exported.safetensors")),
                           strict=True)
  again = torch_outputs(reloaded, images, texts, context, sot, eot)
  report["export_roundtrip_max_abs"] = max(
      float(np.abs(again[k] - ref[k]).max()) for k in ("image_features", "text_features", "logits"))
  report["export_greedy_identical"] = bool((again["greedy"] == ref["greedy"]).all())
  print(json.dumps(report, indent=2))
  if tiny:
    os.replace(os.path.join(work, "oc.safetensors"),
               os.path.join(args.out, "open_clip_tiny_coca.safetensors"))
    np.savez_compressed(os.path.join(args.out, "open_clip_tiny_coca_outputs.npz"), images=images,
                        texts=texts, **ref)


if __name__ == "__main__":
  main()
