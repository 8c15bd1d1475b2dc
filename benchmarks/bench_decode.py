r"""Greedy caption decoding: KV cache vs recomputing the whole prefix every token.

  python benchmarks/bench_decode.py [--config experiments/demo.py] [--tokens 30] \
      [--batch_sizes 1,32] [--repeats 5] [--decode_weights int8,bfloat16] \
      [--decoders cached,recompute,prefix]

  # Decoding weights on open_clip's B/32 layout (float32 vs int8 vs bf16 decoder kernels):
  python benchmarks/bench_decode.py --config experiments/openclip_coca.py:model=coca_ViT-B-32 \
      --batch_sizes 2 --decoders cached --decode_weights int8,bfloat16

Same model (the config's architecture, random weights: speed does not depend on them; text
max_len raised to tokens + 2 so `tokens` fit), same images, exactly `tokens` new tokens per
caption (EOS is forbidden until then). Three decoders, all jitted and warmed up first:
  cached      coca_jax.inference.generate: one decoder step per token over the KV cache (lax.while_loop).
  recompute   generate.recompute_greedy: every token re-runs both text decoders over the padded
              [batch, max_len] text (one compiled while_loop; no cache).
  prefix      every token re-runs the decoders over the prefix so far, [batch, t] (one compiled
              function per length, like a framework without a cache that grows its input).
  cached_<w>   the cached decoder with decoding weights w (`--decode_weights`: 'int8' or
              'bfloat16' decoder kernels, float32 accumulation; `generate.decoder_params`).
Each decoder takes images and encodes them once (the same image tower for all three); `encode`
times that encoding alone. The decoders and `encode` run in turns, `repeats` rounds, and each
time is the median over the rounds, so a change in the machine's load hits all of them alike.
The fraction of captions identical to the cached decoder's is reported. Prints one JSON object
per batch size: per decoder `<name>_seconds` (end to end: images in, tokens out),
`<name>_decode_seconds` (that minus `encode_seconds`), captions/sec and tokens/sec (end to end);
`speedup_vs_<recompute|prefix|best_recompute>` (end to end) and `decode_speedup_vs_...` (decoding
alone) of the cache over the recomputing decoders.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from coca_jax.core import config as config_lib  # noqa: E402
from coca_jax.data.tokenizer import BOS_ID, EOS_ID  # noqa: E402
from coca_jax.inference import generate as gen  # noqa: E402
from coca_jax.models.coca import CoCa, text_attention_mask  # noqa: E402
from coca_jax.training import step as step_lib  # noqa: E402


def last_token_logits(module: CoCa, prefix, context):
  """Decoder logits after prefix [B, t] (no cache, no padding) -> [B, V]."""
  length = prefix.shape[1]
  x = module.token_embed(prefix) + module.text_pos_embed[:length].astype(module.config.compute_dtype)
  mask = text_attention_mask(prefix)[:, :, :-1, :-1]  # Causal; the CLS would come after.
  x = module.unimodal(x, mask=mask)
  x = module.multimodal(x, mask=mask, context=context)
  return module._vocab_logits(module.ln_decoder(x[:, -1])).astype(jnp.float32)


def make_prefix_decoder(model: CoCa, encode, tokens: int):
  @jax.jit
  def next_token(params, prefix, context):
    logits = model.apply({"params": params}, prefix, context, method=last_token_logits)
    return jnp.argmax(gen.allowed_logits(logits, prefix.shape[1] - 1, tokens), -1).astype(
        jnp.int32)

  def decode(params, images):
    context = encode(params, images)
    prefix = jnp.full((images.shape[0], 1), BOS_ID, jnp.int32)
    for _ in range(tokens):
      prefix = jnp.concatenate([prefix, next_token(params, prefix, context)[:, None]], axis=1)
    return prefix
  return decode


def timed_in_turns(fns: dict, repeats: int) -> dict:
  """{name: median seconds}; one call of each fn per round, so load changes hit all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # Warm-up (compiles).
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/demo.py")
  parser.add_argument("--tokens", type=int, default=30)
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--decode_weights", default="",
                      help="Comma-separated decoding-weight formats to time beside float32 "
                           "(int8, bfloat16).")
  parser.add_argument("--decoders", default="cached,recompute,prefix",
                      help="Which float32 decoders to time (cached is always timed).")
  args = parser.parse_args()
  decoders = set(args.decoders.split(",")) | {"cached"}
  weights = [w for w in args.decode_weights.split(",") if w]

  config = config_lib.load_config(args.config)
  config.model.text.max_len = max(config.model.text.max_len, args.tokens + 2)
  model = step_lib.build_model(config)
  size = config.model.image_size
  params = step_lib.init_params(config, model, jax.random.key(0))
  decoding = gen.Decoding(max_new_tokens=args.tokens, min_len=args.tokens)
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CoCa.encode_image)[1])
  prefix_decode = make_prefix_decoder(model, encode, args.tokens)
  prepared = {w: gen.decoder_params(model, params, w) for w in weights}
  for batch in [int(b) for b in args.batch_sizes.split(",")]:
    images = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
    runs = {
        "cached": lambda: gen.generate(model, params, images, decoding)["tokens"],
        "recompute": lambda: gen.recompute_greedy(model, params, images, args.tokens,
                                                  args.tokens)["tokens"],
        "prefix": lambda: prefix_decode(params, images),
    }
    runs = {name: fn for name, fn in runs.items() if name in decoders}
    for w in weights:
      runs[f"cached_{w}"] = (lambda w=w: gen.generate(model, params, images, decoding,
                                                      decoder_params=prepared[w])["tokens"])
    outputs = {name: np.asarray(fn())[:, :args.tokens + 1] for name, fn in runs.items()}
    result = {"config": args.config, "device": jax.devices()[0].device_kind, "batch": batch,
              "tokens": args.tokens, "max_len": config.model.text.max_len,
              "dtype": config.model.dtype}
    for name, out in outputs.items():
      assert not (out[:, 1:] == EOS_ID).any() and out.shape[1] == args.tokens + 1
      # Random weights give near-tied logits: a float32 reordering can flip an argmax (then the
      # captions diverge). The tests check exact agreement on a peaked model; here we report it.
      result[f"{name}_same_tokens"] = float(np.mean(np.all(out == outputs["cached"], axis=1)))
    seconds = timed_in_turns({**runs, "encode": lambda: encode(params, images)}, args.repeats)
    result["encode_seconds"] = round(seconds.pop("encode"), 5)
    decode_seconds = {name: s - result["encode_seconds"] for name, s in seconds.items()}
    for name, s in seconds.items():
      result[f"{name}_seconds"] = round(s, 5)
      result[f"{name}_decode_seconds"] = round(decode_seconds[name], 5)
      result[f"{name}_captions_per_sec"] = round(batch / s, 2)
      result[f"{name}_tokens_per_sec"] = round(batch * args.tokens / s, 1)
    for kind, t in (("", seconds), ("decode_", decode_seconds)):
      if {"recompute", "prefix"} <= decoders:
        result[f"{kind}speedup_vs_recompute"] = round(t["recompute"] / t["cached"], 2)
        result[f"{kind}speedup_vs_prefix"] = round(t["prefix"] / t["cached"], 2)
        result[f"{kind}speedup_vs_best_recompute"] = round(
            min(t["recompute"], t["prefix"]) / t["cached"], 2)
      for w in weights:  # > 1: the narrow weights are faster than float32.
        result[f"{kind}speedup_{w}_vs_float32"] = round(t["cached"] / t[f"cached_{w}"], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
