r"""coca_jax vs open_clip on the same machine: train step, peak memory, 30-token captions.

  python benchmarks/bench_openclip.py [--torch_python /work/venv-torch/bin/python] \
      [--rounds 2] [--steps 3] [--batch 16] [--caption_batch 2] [--tokens 30] \
      [--parts train,caption] [--ours_args ';unrolled,remat=none'] [--out result.json]

The same architecture on both sides: open_clip's `coca_ViT-B-32` and our
`experiments/openclip_coca.py:model=coca_ViT-B-32` (its open_clip layout: same shapes, same
parameter count). `--ours_args` adds variants of our side to the train part: ';'-separated extra
args of that config (the empty one is the default: scanned layers, remat='dots'), e.g.
'unrolled,remat=none' for the unrolled layers without remat that were the default before. Every
variant runs in each round beside open_clip.
Each measurement runs in its own process, so each side's peak RSS is its own, and the two sides
alternate (ours, theirs, then theirs, ours, ...) for `--rounds` rounds so a change in the
machine's load hits both alike. Reported per side: medians over all rounds of the wall time and
the process CPU time.

  train    one AdamW step (fwd + bwd + global-norm clip 1.0 + update; b1 0.9, b2 0.98, eps 1e-6,
           weight decay 0.1), float32, batch `--batch` of random images and random captions of
           the full text length; open_clip's CoCaLoss against our loss with the same weights
           (contrastive 1, caption 2). Ours: the jitted train step of `coca_jax.training.step`; theirs:
           `loss.backward()` + `torch.optim.AdamW`. Also XLA's temp bytes of our step.
  caption  `--tokens` greedy tokens for `--caption_batch` images, image in, tokens out. Ours:
           KV-cached `coca_jax.inference.generate` (float32, and the int8 / bfloat16 decoding weights,
           which on CPU run the kernels of `coca_jax.models.kernels.cpu`);
           theirs: `CoCa.generate(generation_type="top_k", top_k=1)`, which re-runs the text
           decoders over the whole prefix each token. Both use OUR random weights, exported
           with `coca_jax.interop.open_clip.to_open_clip` (vocab head scaled x8 so argmax
           decisions are well separated, like a trained model's), so the tokens must agree.

open_clip runs under `--torch_python`, a Python with torch, open_clip_torch and transformers
(which open_clip's `generate` needs); this package's environment needs no torch. Without one,
the benchmark prints why and exits with status 0 (it is a benchmark, not a test). How the torch
environment of the figures in docs/performance.md was made:
  python -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 \
      "transformers<4.56"
(the package index's torch/torchvision 2.14.1+cu130 / 0.29.1+cu130 builds, run on the CPU).
open_clip 3.3.0's `generate` imports `BeamSearchScorer` from transformers; 5.24 and 4.57.6 no
longer export it (open_clip then refuses to generate); 4.55.4 does.

Prints one JSON object: per side and part the medians, peak RSS, and the ratios
`<part>_speedup` = open_clip time / ours (> 1: ours is faster) and `train_rss_ratio` = ours /
open_clip (< 1: ours uses less).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/openclip_coca.py:model=coca_ViT-B-32"
OPEN_CLIP_MODEL = "coca_ViT-B-32"
LOGIT_GAIN = 8.0
DEFAULT_TORCH_PYTHON = os.environ.get("COCA_JAX_TORCH_PYTHON", "/work/venv-torch/bin/python")


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB.


def timed(fn, repeats: int, sync=lambda x: x) -> tuple[list, list]:
  """(wall seconds, process CPU seconds) of `repeats` calls after one warm-up call."""
  sync(fn())
  walls, cpus = [], []
  for _ in range(repeats):
    wall, cpu = time.perf_counter(), time.process_time()
    sync(fn())
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return walls, cpus


# -- Our side (this package's environment) -----------------------------------------------------


def _our_config(batch: int, extra_args: str = ""):
  sys.path.insert(0, REPO)
  from coca_jax.core import config as config_lib
  spec = CONFIG + (f",{extra_args}" if extra_args else "")
  config = config_lib.load_config(os.path.join(REPO, spec))
  config.train.batch_size = batch
  config.model.dtype = "float32"
  return config


def ours_train(args) -> dict:
  import jax
  from coca_jax import bench
  from coca_jax.training import step
  config = _our_config(args.batch, args.config_args)
  built = step.setup(config)
  with jax.set_mesh(built.mesh):
    compiled = built.train_step().lower(
        built.sharded_abstract_state, bench._abstract_batch(config, built.mesh)).compile()
    memory = bench._memory_report(compiled)
    state = built.init_state(seed=0)
    batch = bench._synthetic_batch(config, built.mesh)
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = compiled(holder["state"], batch)
      return metrics
    walls, cpus = timed(one_step, args.steps, jax.block_until_ready)
  return {"wall": walls, "cpu": cpus, "peak_rss_bytes": peak_rss_bytes(),
          "xla_temp_bytes": memory.get("temp_size_in_bytes"),
          "text_length": config.model.text.max_len, "image_size": config.model.image_size,
          "scan_layers": config.model.scan_layers, "remat": config.model.remat}


def ours_caption(args) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from coca_jax.core import schema
  from coca_jax.inference import generate as gen
  from coca_jax.interop import open_clip, params as flat_params
  from coca_jax.training import step
  config = _our_config(args.caption_batch)
  model = step.build_model(config)
  size = config.model.image_size
  params = step.init_params(config, model, jax.random.key(0))
  params["vocab_head"]["kernel"] = params["vocab_head"]["kernel"] * LOGIT_GAIN
  images = np.asarray(jax.random.normal(jax.random.key(1), (args.caption_batch, size, size, 3)))
  weights_file = os.path.join(args.workdir, "weights.safetensors")
  if not os.path.exists(weights_file):  # Shared with the open_clip side.
    model_config = schema.build(schema.CoCa, config.model)
    state = open_clip.to_open_clip(flat_params.flatten(model_config, params), model_config)
    open_clip.write_safetensors(state, weights_file, {"format": "pt"})
    np.save(os.path.join(args.workdir, "images.npy"), images)  # NHWC, normalised.
  images = jnp.asarray(images)
  decoding = gen.Decoding(max_new_tokens=args.tokens, min_len=args.tokens)
  result = {"peak_rss_bytes": 0}
  for weights in (None, "int8", "bfloat16"):
    prepared = gen.decoder_params(model, params, weights)
    run = lambda: gen.generate(model, params, images, decoding, decoder_params=prepared)["tokens"]
    walls, cpus = timed(run, args.caption_repeats, jax.block_until_ready)
    name = weights or "float32"
    result[name] = {"wall": walls, "cpu": cpus, "tokens": np.asarray(run())[:, 1:].tolist()}
  result["peak_rss_bytes"] = peak_rss_bytes()
  return result


# -- open_clip's side (the torch environment; imports nothing of this package) -----------------


def _open_clip_model():
  import open_clip
  import torch
  torch.manual_seed(0)
  return open_clip.create_model(OPEN_CLIP_MODEL, pretrained=None)


def theirs_train(args) -> dict:
  import torch
  from open_clip.loss import CoCaLoss
  model = _open_clip_model().train()
  text_length = model.text.context_length
  loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.1)
  generator = torch.Generator().manual_seed(0)
  images = torch.randn(args.batch, 3, 224, 224, generator=generator)
  text = torch.zeros(args.batch, text_length, dtype=torch.long)
  lengths = torch.randint(1, text_length - 1, (args.batch,), generator=generator)
  for row, n in enumerate(lengths.tolist()):  # SOT, n random tokens, EOT, pads.
    text[row, 0], text[row, n + 1] = 49406, 49407
    text[row, 1:n + 1] = torch.randint(1, 49406, (n,), generator=generator)

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    out = model(images, text)
    contrastive, caption = loss_fn(out["image_features"], out["text_features"], out["logits"],
                                   out["labels"], out["logit_scale"])
    loss = contrastive + caption
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()
  walls, cpus = timed(one_step, args.steps)
  return {"wall": walls, "cpu": cpus, "peak_rss_bytes": peak_rss_bytes(),
          "text_length": text_length, "threads": torch.get_num_threads()}


def theirs_caption(args) -> dict:
  import numpy as np
  import safetensors.torch
  import torch
  model = _open_clip_model().eval()
  model.load_state_dict(safetensors.torch.load_file(
      os.path.join(args.workdir, "weights.safetensors")))
  images = torch.from_numpy(np.load(os.path.join(args.workdir, "images.npy"))).permute(0, 3, 1, 2)

  def run():
    # seq_len counts the SOT: SOT + tokens; the last step's logits are computed, then EOT
    # is forced in their place, so `tokens` forward passes give tokens - 1 free tokens + EOT.
    return model.generate(images.contiguous(), seq_len=args.tokens + 1,
                          generation_type="top_k", top_k=1, min_seq_len=args.tokens,
                          fixed_output_length=True)
  walls, cpus = timed(run, args.caption_repeats)
  return {"float32": {"wall": walls, "cpu": cpus, "tokens": run()[:, 1:].tolist()},
          "peak_rss_bytes": peak_rss_bytes(), "threads": torch.get_num_threads()}


WORKERS = {"ours_train": ours_train, "ours_caption": ours_caption,
           "theirs_train": theirs_train, "theirs_caption": theirs_caption}


# -- The driver --------------------------------------------------------------------------------


def _torch_missing(python: str) -> str | None:
  """Why `python` cannot run the open_clip side, or None."""
  if not os.path.exists(python):
    return f"{python} does not exist"
  probe = subprocess.run(
      [python, "-c", "import torch, safetensors, open_clip.coca_model as m; "
       "assert m._has_transformers, 'open_clip cannot import what its generate needs from "
       "transformers (BeamSearchScorer, logits processors); install a transformers that has them'"],
      capture_output=True, text=True)
  if probe.returncode:
    return (f"{python} cannot run open_clip's CoCa generate: "
            f"{probe.stderr.strip().splitlines()[-1][-300:] if probe.stderr.strip() else ''}")
  return None


def _run_worker(python: str, name: str, args, env: dict, config_args: str = "") -> dict:
  command = [python, os.path.abspath(__file__), "--worker", name, "--workdir", args.workdir,
             "--batch", str(args.batch), "--caption_batch", str(args.caption_batch),
             "--tokens", str(args.tokens), "--steps", str(args.steps),
             "--caption_repeats", str(args.caption_repeats), "--config_args", config_args]
  label = f"{name}[{config_args}]" if config_args else name
  print(f"[bench_openclip] {label} ...", file=sys.stderr, flush=True)
  proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  if proc.returncode:
    raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  line = proc.stdout.strip().splitlines()[-1]
  print(f"[bench_openclip] {label}: {line}", file=sys.stderr, flush=True)  # Raw, as it comes.
  return json.loads(line)


def _median(runs: list, part: str | None, key: str) -> float:
  values = [v for run in runs for v in (run[part] if part else run)[key]]
  return round(statistics.median(values), 4)


def drive(args) -> dict:
  why = _torch_missing(args.torch_python)
  if why:
    return {"skipped": f"open_clip side unavailable: {why}. Pass --torch_python PYTHON (or set "
                       "COCA_JAX_TORCH_PYTHON) with torch, open_clip_torch and transformers "
                       "installed; see this file's docstring."}
  ours_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                  JAX_PLATFORMS="cpu")
  theirs_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
  sides = {"ours": (sys.executable, ours_env), "theirs": (args.torch_python, theirs_env)}
  parts = args.parts.split(",")
  variants = list(dict.fromkeys(args.ours_args.split(";")))  # "" = the config as it is.
  runs = collections.defaultdict(list)  # (side, part, config args) -> worker results
  for round_index in range(args.rounds):
    for part in parts:
      order = [("ours", v) for v in (variants if part == "train" else [""])] + [("theirs", "")]
      for side, variant in (order if round_index % 2 == 0 else order[::-1]):
        python, env = sides[side]
        runs[side, part, variant].append(
            _run_worker(python, f"{side}_{part}", args, env, variant))
  result = {"config": CONFIG, "open_clip_model": OPEN_CLIP_MODEL, "rounds": args.rounds,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg()}
  if "train" in parts:
    theirs = runs["theirs", "train", ""]
    result["train_variants"] = []
    for variant in variants:
      ours = runs["ours", "train", variant]
      seconds = _median(ours, None, "wall")
      rss = round(max(r["peak_rss_bytes"] for r in ours) / 1e9, 2)
      result["train_variants"].append({
          "config_args": variant, "scan_layers": ours[0]["scan_layers"], "remat": ours[0]["remat"],
          "ours_seconds": seconds, "ours_cpu_seconds": _median(ours, None, "cpu"),
          "ours_peak_rss_gb": rss, "ours_xla_temp_gb": round(ours[0]["xla_temp_bytes"] / 1e9, 2),
          "speedup": round(_median(theirs, None, "wall") / seconds, 2),
          "rss_ratio": round(rss / (max(r["peak_rss_bytes"] for r in theirs) / 1e9), 2)})
    ours = runs["ours", "train", variants[0]]  # The headline figures: the first variant.
    result["train"] = {
        "batch": args.batch, "steps_per_round": args.steps,
        "ours_seconds": _median(ours, None, "wall"), "theirs_seconds": _median(theirs, None, "wall"),
        "ours_cpu_seconds": _median(ours, None, "cpu"),
        "theirs_cpu_seconds": _median(theirs, None, "cpu"),
        "ours_peak_rss_gb": round(max(r["peak_rss_bytes"] for r in ours) / 1e9, 2),
        "theirs_peak_rss_gb": round(max(r["peak_rss_bytes"] for r in theirs) / 1e9, 2),
        "ours_xla_temp_gb": round(ours[0]["xla_temp_bytes"] / 1e9, 2),
        "text_length": [ours[0]["text_length"], theirs[0]["text_length"]]}
    t = result["train"]
    result["train_speedup"] = round(t["theirs_seconds"] / t["ours_seconds"], 2)
    result["train_cpu_speedup"] = round(t["theirs_cpu_seconds"] / t["ours_cpu_seconds"], 2)
    result["train_rss_ratio"] = round(t["ours_peak_rss_gb"] / t["theirs_peak_rss_gb"], 2)
  if "caption" in parts:
    ours, theirs = runs["ours", "caption", ""], runs["theirs", "caption", ""]
    caption = {"batch": args.caption_batch, "tokens": args.tokens,
               "theirs_seconds": _median(theirs, "float32", "wall"),
               "theirs_cpu_seconds": _median(theirs, "float32", "cpu")}
    # Their last token is the forced EOT; compare the tokens - 1 free ones.
    reference = [row[:args.tokens - 1] for row in theirs[0]["float32"]["tokens"]]
    for weights in ("float32", "int8", "bfloat16"):
      caption[f"ours_{weights}_seconds"] = _median(ours, weights, "wall")
      caption[f"ours_{weights}_cpu_seconds"] = _median(ours, weights, "cpu")
      mine = [row[:args.tokens - 1] for row in ours[0][weights]["tokens"]]
      caption[f"ours_{weights}_same_tokens_as_open_clip"] = sum(
          a == b for a, b in zip(mine, reference)) / len(reference)
      # Narrow weights round the logits: on random weights a near-tie can flip a token.
      caption[f"ours_{weights}_same_tokens_as_ours_float32"] = [
          a == b for a, b in zip(ours[0][weights]["tokens"], ours[0]["float32"]["tokens"])]
      caption[f"ours_{weights}_first_token_differing_from_float32"] = [
          next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
          for a, b in zip(ours[0][weights]["tokens"], ours[0]["float32"]["tokens"])]
      result[f"caption_speedup_{weights}"] = round(
          caption["theirs_seconds"] / caption[f"ours_{weights}_seconds"], 2)
    result["caption"] = caption
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--torch_python", default=DEFAULT_TORCH_PYTHON)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=3, help="Timed train steps per process.")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--caption_batch", type=int, default=2)
  parser.add_argument("--tokens", type=int, default=30)
  parser.add_argument("--caption_repeats", type=int, default=3)
  parser.add_argument("--parts", default="train,caption")
  parser.add_argument("--ours_args", default="",
                      help="';'-separated variants of our config for the train part (extra args "
                           "of experiments/openclip_coca.py; '' = as it is); the first is the "
                           "headline. E.g. ';unrolled,remat=none'.")
  parser.add_argument("--config_args", default="", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  parser.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    if args.worker.startswith("ours"):
      sys.path.insert(0, REPO)
      from coca_jax.core import runtime
      runtime.preload_allocator()  # As the CLIs do (re-executes once with mimalloc).
    print(json.dumps(WORKERS[args.worker](args)))
    return
  with tempfile.TemporaryDirectory() as workdir:
    args.workdir = workdir
    result = drive(args)
  if "skipped" in result:
    print(f"bench_openclip: skipped: {result['skipped']}", file=sys.stderr)
  text = json.dumps(result)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
