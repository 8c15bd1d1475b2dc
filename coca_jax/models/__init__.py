"""Model code: layers, feed-forward experts, the block stack, and the model families.

`config.model.backbone` picks the family: 'towers' (CoCa: image encoder + text decoders,
`coca.CoCa`) or 'mome' (one shared stack with modality experts, `mome.MoME`). Both have the same
model-facing interface; `model_config`, `build` and `unscanned_layers` dispatch on it.
"""
from coca_jax.core import schema
from coca_jax.models.coca import CoCa, CoCaConfig
from coca_jax.models.coca import router_statistics as _coca_router_statistics
from coca_jax.models.coca import unscanned_layers as _coca_unscanned_layers
from coca_jax.models.mome import MoME, MoMEConfig
from coca_jax.models.mome import router_statistics as _mome_router_statistics

BACKBONES = schema.BACKBONES


def model_config(model) -> CoCaConfig | MoMEConfig:
  """The hashable model settings of `config.model` (`schema.CoCa` or `schema.MoME`, by its
  backbone)."""
  return schema.build_model(model)


def build(config: CoCaConfig | MoMEConfig, decode: bool = False, itm: bool = False) -> CoCa | MoME:
  """The model for `config` (`decode=True`: built for KV-cached `decode_step`; `itm`: a MoME
  with its image-text matching head)."""
  if isinstance(config, MoMEConfig):
    return MoME(config, decode=decode, itm=itm)
  return CoCa(config, decode=decode)


def unscanned_layers(config, params):
  """(config, params) in the layer layout KV-cached decoding needs (MoME never scans)."""
  if isinstance(config, MoMEConfig):
    return config, params
  return _coca_unscanned_layers(config, params)


def router_statistics(intermediates, config) -> dict[str, dict]:
  """The sown 'intermediates' of a training apply -> {routed feed-forward: its router
  statistics} (empty for a model without learned routing); names per family, see
  `coca.router_statistics` and `mome.router_statistics`."""
  if not intermediates:
    return {}
  if isinstance(config, MoMEConfig):
    return _mome_router_statistics(intermediates, config)
  return _coca_router_statistics(intermediates, config)


__all__ = ["BACKBONES", "CoCa", "CoCaConfig", "MoME", "MoMEConfig", "build",
           "model_config", "router_statistics", "unscanned_layers"]
