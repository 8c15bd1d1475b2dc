"""Evaluation: zero-shot classification, image-text retrieval and captioning metrics."""

from coca_jax.evaluation.metrics import caption_scores
from coca_jax.evaluation.metrics import dense_topk
from coca_jax.evaluation.metrics import retrieval_ceiling
from coca_jax.evaluation.metrics import retrieval_metrics
from coca_jax.evaluation.metrics import sharded_topk
from coca_jax.evaluation.metrics import tokenize_caption
from coca_jax.evaluation.metrics import zero_shot_accuracy
from coca_jax.evaluation.metrics import zero_shot_classifier

__all__ = [
    'caption_scores',
    'dense_topk',
    'retrieval_ceiling',
    'retrieval_metrics',
    'sharded_topk',
    'tokenize_caption',
    'zero_shot_accuracy',
    'zero_shot_classifier',
]
