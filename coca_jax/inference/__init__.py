"""Inference: `coca_jax.load` (api), KV-cached decoding (greedy, beam, nucleus; int8 weights)."""
