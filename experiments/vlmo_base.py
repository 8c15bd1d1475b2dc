"""VLMo-Base (Bao et al. 2022, "VLMo: Unified Vision-Language Pre-Training with
Mixture-of-Modality-Experts"): a MoME backbone of 12 layers, width 768, 12 heads, MLP 3072, with
the VL-FFN in the top 2 layers; 224px images in 16px patches (196 tokens); BERT's uncased
WordPiece vocabulary size (30,522); 40 text positions.

  python -m coca_jax.train --config experiments/vlmo_base.py --dry_run
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=image --workdir W1
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=text,init=W1 --workdir W2
  python -m coca_jax.train --config experiments/vlmo_base.py:stage=image_text,init=W2 --workdir W3
Each training command also takes the dataset, built with `python -m coca_jax.data.build`:
--config.data.name=NAME --config.data.data_dir=DIR.

Args (comma-separated after ':'):
  stage=S   image | text | image_text (default): VLMo's stagewise pretraining schedule, as
            parameter freezing (`optim.freeze_regex`):
              image       trains the shared attention, ffn_image and the image side; ffn_text,
                          ffn_fusion and the text side are frozen.
              text        the shared attention (and its LayerNorm) and ffn_image are frozen
                          (VLMo's stage 2); ffn_text and the text side train.
              image_text  everything trains, with image-text matching on hard negatives.
  init=DIR  start from the parameters of a previous stage's workdir or checkpoint step
            directory (`config.init.source`; the optimizer starts fresh).
  batch=N, steps=N, runlocal  as in experiments/coca_base.py.

Parameters: --dry_run reports 176.6M total (VLMo's paper: 175M; +0.9%). Where they are: 12
layers of shared attention (2.36M each) + V-FFN and L-FFN (4.72M each) = 141.7M; VL-FFN in the
top 2 layers, 9.4M; the word embedding, 23.4M, shared with the vocab head (`tie_embeddings`,
like VLMo's MLM head; an untied head would add another 23.4M); patch embedding 0.6M; positions
and [CLS] 0.18M: 175.4M, the paper's count (backbone and embeddings); plus the two contrastive
projections (1.2M) and the ITM head. Active per token (one expert per layer): 110.5M.
What is modelled and what is not: the MoME layer (shared attention, per-modality FFN experts,
VL-FFN on top), the image [CLS] token as the contrastive image embedding (`pooling='cls'`),
contrastive learning, ITM with global hard negatives, and the stage schedule. NOT modelled:
VLMo's layer-scale (init 0.1; 2 x 768 parameters a layer), its relative position bias in the
image self-attention (732 x 12 a layer; learned absolute positions instead), the query/value-only
biases of its attention (ours also have a key bias), its ITC/ITM poolers' extra dense layers
and its masked-language-model objective (captioning, i.e. prefix-causal next-token prediction
on the fused stack, takes its place). Stages 1 and 2 of VLMo train with masked image modelling
on images alone and masked language modelling on text alone; here every stage trains on
image-text pairs with this framework's losses, so only the freezing schedule is VLMo's.
Optimizer (VLMo's stage 3): AdamW, peak lr 2e-4, weight decay 0.01, b2 0.98, 2.5% warmup
then linear decay; batch 1024.
"""

from coca_jax.core import recipes

# The recipe is shared with experiments/mome_coca_base.py: coca_jax/core/recipes.py (`mome`; the
# stage freezing lists are recipes.TEXT_SIDE and recipes.SHARED_AND_IMAGE).


def get_config(arg: str = ""):
  return recipes.mome(width=768, depth=12, heads=12, mlp_dim=3072, fusion_layers=2, arg=arg)
