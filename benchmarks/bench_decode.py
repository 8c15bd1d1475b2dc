r"""Greedy caption decoding: KV cache vs recomputing the whole prefix every token.

  python benchmarks/bench_decode.py [--config experiments/demo.py] [--tokens 30] \
      [--batch_sizes 1,32] [--repeats 5]

Same model (the config's architecture, random weights: speed does not depend on them; text
max_len raised to tokens + 2 so `tokens` fit), same images, exactly `tokens` new tokens per
caption (EOS is forbidden until then). Three decoders, all jitted and warmed up first:
  cached      coca_jax.generate: one decoder step per token over the KV cache (lax.while_loop).
  recompute   generate.recompute_greedy: every token re-runs both text decoders over the padded
              [batch, max_len] text (one compiled while_loop; no cache).
  prefix      every token re-runs the decoders over the prefix so far, [batch, t] (one compiled
              function per length, like a framework without a cache that grows its input).
The fraction of captions identical to the cached decoder's is reported. Prints one JSON object per batch size with
captions/sec and tokens/sec of each and the speed-up of the cache over the faster recompute.
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

from coca_jax import config as config_lib, generate as gen, step as step_lib  # noqa: E402
from coca_jax.data.tokenizer import BOS_ID, EOS_ID  # noqa: E402
from coca_jax.models.coca import CoCa, text_attention_mask  # noqa: E402


def last_token_logits(module: CoCa, prefix, context):
  """Decoder logits after prefix [B, t] (no cache, no padding) -> [B, V]."""
  length = prefix.shape[1]
  x = module.token_embed(prefix) + module.text_pos_embed[:length].astype(module.config.compute_dtype)
  mask = text_attention_mask(prefix)[:, :, :-1, :-1]  # Causal; the CLS would come after.
  x = module.unimodal(x, mask=mask)
  x = module.multimodal(x, mask=mask, context=context)
  return module._vocab_logits(module.ln_decoder(x[:, -1])).astype(jnp.float32)


def make_prefix_decoder(model: CoCa, tokens: int):
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CoCa.encode_image)[1])

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


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # Warm-up (compiles).
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/demo.py")
  parser.add_argument("--tokens", type=int, default=30)
  parser.add_argument("--batch_sizes", default="1,32")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  config = config_lib.load_config(args.config)
  config.model.text.max_len = max(config.model.text.max_len, args.tokens + 2)
  model = step_lib.build_model(config)
  size = config.model.image_size
  params = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 3)),
                                        jnp.zeros((1, config.model.text.max_len), jnp.int32)))(
                                            jax.random.key(0))["params"]
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  decoding = gen.Decoding(max_new_tokens=args.tokens, min_len=args.tokens)
  prefix_decode = make_prefix_decoder(model, args.tokens)
  for batch in [int(b) for b in args.batch_sizes.split(",")]:
    images = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
    runs = {
        "cached": lambda: gen.generate(model, params, images, decoding)["tokens"],
        "recompute": lambda: gen.recompute_greedy(model, params, images, args.tokens,
                                                  args.tokens)["tokens"],
        "prefix": lambda: prefix_decode(params, images),
    }
    outputs = {name: np.asarray(fn())[:, :args.tokens + 1] for name, fn in runs.items()}
    result = {"config": args.config, "device": jax.devices()[0].device_kind, "batch": batch,
              "tokens": args.tokens, "max_len": config.model.text.max_len,
              "dtype": config.model.dtype}
    for name, out in outputs.items():
      assert not (out[:, 1:] == EOS_ID).any() and out.shape[1] == args.tokens + 1
      # Random weights give near-tied logits: a float32 reordering can flip an argmax (then the
      # captions diverge). The tests check exact agreement on a peaked model; here we report it.
      result[f"{name}_same_tokens"] = float(np.mean(np.all(out == outputs["cached"], axis=1)))
    seconds = {name: timed(fn, args.repeats) for name, fn in runs.items()}
    for name, s in seconds.items():
      result[f"{name}_seconds"] = round(s, 5)
      result[f"{name}_captions_per_sec"] = round(batch / s, 2)
      result[f"{name}_tokens_per_sec"] = round(batch * args.tokens / s, 1)
    result["speedup_vs_recompute"] = round(seconds["recompute"] / seconds["cached"], 2)
    result["speedup_vs_prefix"] = round(seconds["prefix"] / seconds["cached"], 2)
    result["speedup_vs_best_recompute"] = round(
        min(seconds["recompute"], seconds["prefix"]) / seconds["cached"], 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
