"""Writes the BEiT import fixtures (tests/test_beit_import.py): two tiny timm `Beit` models with
random weights, their state dicts, an input image batch and their outputs.

Runs in a SEPARATE torch environment, never in the project's:
  /work/torchenv/bin/pip install torch==2.13.0 safetensors numpy pillow
  /work/torchenv/bin/pip install --no-deps timm==1.0.31
  /work/torchenv/bin/python tests/data/make_beit_fixtures.py [--out tests/data]

timm imports torchvision when it is imported (data transforms, FrozenBatchNorm2d) although
`Beit` never calls it, and PyPI's torchvision does not import beside the CPU torch of that
environment; the builder stands in an empty `torchvision` package whose classes cannot be
instantiated, so anything that did use it would fail loudly.

The two models cover both layouts of BEiT's relative position bias:
  per_layer  a table in every block (`blocks.N.attn.relative_position_bias_table`), layer scale,
             mean pooling with `fc_norm` and no final `norm`: the layout of timm's
             beit_base_patch16_224 (BEiT's fine-tuned checkpoints);
  shared     one table for all blocks (`rel_pos_bias.relative_position_bias_table`), layer
             scale, the final `norm`, no `fc_norm`: the layout of BEiT's self-supervised
             (pre-training) checkpoints.
Both: 32px images in 8px patches (a 4x4 grid), width 32, 2 blocks, 4 heads, MLP 128. Every
parameter is moved off its initial value (zero biases and tables, unit LayerNorms, layer scale
0.1), so every mapping is exercised.

Writes, into --out:
  beit_tiny_<layout>.safetensors  the state dict (float32)
  beit_tiny.json                  the tiny architecture, timm's version, the state-dict shapes
  beit_tiny_outputs.npz           image (NHWC), and per layout the token states after the final
                                  norm (`forward_features`, [batch, 1 + patches, width])
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

import numpy as np

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4,
            qkv_bias=True, init_values=0.1, use_abs_pos_emb=False, num_classes=0)
LAYOUTS = {
    "per_layer": dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, global_pool="avg"),
    "shared": dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token"),
}


class _StandInClass(type):
  """A torchvision class timm names at import time: attributes are names, instances refused."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return f"{cls.__name__}.{name}"

  def __call__(cls, *args, **kwargs):
    raise RuntimeError(f"torchvision's {cls.__name__} is a stand-in in this fixture builder")


class _StandInModule(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    value = _StandInClass(name, (), {})
    setattr(self, name, value)
    return value


class _StandInTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  def find_spec(self, name, path, target=None):
    if name == "torchvision" or name.startswith("torchvision."):
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StandInModule(spec.name)
    module.__path__ = []
    return module

  def exec_module(self, module):
    pass


def build(layout: str, seed: int):
  import torch
  from timm.models.beit import Beit
  torch.manual_seed(seed)
  model = Beit(**TINY, **LAYOUTS[layout]).eval()
  with torch.no_grad():  # Off the initial values: zero tables and biases, LN 1/0, gamma 0.1.
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  args = parser.parse_args()
  sys.meta_path.insert(0, _StandInTorchvision())
  import timm
  import torch
  from safetensors.torch import save_file

  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, TINY["img_size"], TINY["img_size"], 3)).astype(np.float32)
  outputs, shapes = {"image": image}, {}
  for i, layout in enumerate(LAYOUTS):
    model = build(layout, seed=i)
    with torch.no_grad():
      tokens = model.forward_features(torch.from_numpy(image.transpose(0, 3, 1, 2).copy()))
    outputs[f"{layout}_tokens"] = tokens.numpy()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, f"beit_tiny_{layout}.safetensors"))
    shapes[layout] = {k: list(v.shape) for k, v in state.items()}
  np.savez_compressed(os.path.join(args.out, "beit_tiny_outputs.npz"), **outputs)
  info = dict(tiny=TINY, layouts=LAYOUTS, state_dict=shapes, timm=timm.__version__,
              torch=torch.__version__)
  with open(os.path.join(args.out, "beit_tiny.json"), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  print(f"wrote {', '.join(LAYOUTS)} to {args.out} (timm {timm.__version__})")


if __name__ == "__main__":
  main()
