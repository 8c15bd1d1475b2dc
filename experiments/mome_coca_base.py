r"""MoME-CoCa at CoCa-Base width: CoCa's objectives (contrastive + captioning, weights 1 and 2)
and its Base sizes (width 768, 12 heads, MLP 3072, 288px images in 18px patches, 64k vocabulary,
64 text positions) on ONE mixture-of-modality-experts stack instead of CoCa's towers. CoCa-Base
has 12 image layers and 12 + 12 text layers; here 12 shared layers carry ffn_image and ffn_text,
and the top 4 also ffn_fusion (the multimodal layers' share of the depth, as in VLMo's 2 of 12
scaled to CoCa's deeper fusion). ITM is on (VLMo's third loss).

  python -m coca_jax.train --config experiments/mome_coca_base.py --dry_run
  python -m coca_jax.train --config experiments/mome_coca_base.py:batch=4096 --workdir W \
      --config.data.name=NAME --config.data.data_dir=DIR   # built with coca_jax.data.build

Args: as experiments/vlmo_base.py (stage=, init=, batch=, steps=, runlocal).
Parameters (--dry_run): 263.6M total (CoCa-Base: 383M), 188.0M active per token (a token runs one
expert per layer). The token embedding is untied from the vocab head, as in CoCa-Base.
Learned routing inside the modality experts (LIMoE-style): set, in a config built on this one,
`c.model.mome.experts = dict(image=dict(num_experts=8, top_k=1, capacity_factor=2.0, every=2),
text=..., fusion=...)` (docs/models.md, "Learned routing"; experiments/demo.py:mome,limoe does so).
"""

from coca_jax.core import recipes


def get_config(arg: str = ""):
  c = recipes.mome(width=768, depth=12, heads=12, mlp_dim=3072, fusion_layers=4, arg=arg,
                   where="experiments/mome_coca_base.py",
                   image_size=288, patch_size=18, tie_embeddings=False, pooling="attention")
  c.model.text.update(vocab_size=64_000, max_len=64)
  c.data.update(tokenizer_vocab=64_000, image_size=288)
  c.loss.update(caption_weight=2.0, itm_weight=c.loss.itm_weight)
  c.optim.update(name="adafactor", lr=8e-4, b1=0.9, b2=0.999, eps=1e-30, warmup_fraction=0.02)
  return c
