"""Model code: layers, feed-forward experts, the block stack, and the CoCa model."""
from coca_jax.models.coca import CoCa, CoCaConfig, TowerConfig

__all__ = ["CoCa", "CoCaConfig", "TowerConfig"]
