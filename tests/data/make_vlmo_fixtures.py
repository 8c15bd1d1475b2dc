"""Writes the VLMo parity fixtures (tests/test_vlmo.py): the official VLMo module (microsoft/unilm,
folder vlmo/) at a tiny size with random weights, its state dict, inputs and outputs.

Runs in a SEPARATE torch environment, never in the project's:
  python3 -m venv /work/torchenv
  /work/torchenv/bin/pip install torch==2.13.0 "transformers==4.57.6" safetensors numpy scipy \
      einops
  /work/torchenv/bin/python tests/data/make_vlmo_fixtures.py \
      --unilm /path/to/unilm/git/dir [--out tests/data]

The official files (vlmo/vlmo/modules/{multiway_transformer,vlmo_module,heads,objectives,
dist_utils}.py) are read from a clone of microsoft/unilm (`--unilm`: its git directory, read with
`git show HEAD:...`, or a work tree) into a scratch folder and imported from there; their code
is not part of this project. What the builder changes or stands in for, none of it touching the
forward pass:
  - `img.get_device()` (-1 on CPU, which `.to(device=...)` rejects) becomes `img.device`;
  - stub modules for what only training or construction uses: pytorch_lightning
    (`LightningModule.save_hyperparameters` keeps the config, `rank_zero_info` prints), timm
    (`to_2tuple`, `trunc_normal_` for initialisation, the model registry and `create_model`;
    `DropPath` is never built: the fixture's drop_path_rate is 0), vlmo_utils.set_metrics
    (torchmetrics logging). timm itself needs a torchvision matching torch, which this
    environment does not have.
transformers 4.x (>= 4.31) is needed: 5.x's BertEmbeddings always adds absolute positions, while
VLMo (written for 4.8.1) builds them with position_embedding_type='rel_pos', which skips them.

Writes, into --out:
  vlmo_tiny.safetensors     the official state dict (float32), every parameter randomised
  vlmo_tiny.json            the tiny official config, parameter counts (tiny and VLMo-Base at
                            full size) and the state-dict keys with their shapes
  vlmo_tiny_outputs.npz     inputs (image NHWC, text ids, mlm ids and labels) and outputs of
                            every pass, and the official MLM losses
"""

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

OFFICIAL_FILES = ("multiway_transformer.py", "vlmo_module.py", "heads.py", "objectives.py",
                  "dist_utils.py")

TINY = dict(image_size=32, patch_size=8, width=32, depth=4, heads=4, vlffn_start=2,
            vocab_size=64, max_text_len=8, max_text_len_of_initckpt=10)


def read_official(unilm: str, name: str) -> str:
  path = f"vlmo/vlmo/modules/{name}"
  if os.path.isfile(os.path.join(unilm, path)):
    with open(os.path.join(unilm, path)) as f:
      return f.read()
  return subprocess.run(["git", "--git-dir", unilm, "show", f"HEAD:{path}"], check=True,
                        capture_output=True, text=True).stdout


def install_stubs():
  """Stand-ins for the modules only training or construction uses (see the docstring)."""
  import torch
  # transformers probes for timm and pytorch_lightning when it is imported: before the stubs.
  import transformers.models.bert.modeling_bert  # noqa: F401

  registry = {}
  pl = types.ModuleType("pytorch_lightning")

  class LightningModule(torch.nn.Module):
    def save_hyperparameters(self):
      frame = inspect.currentframe().f_back
      self.hparams = types.SimpleNamespace(config=frame.f_locals["config"])

  pl.LightningModule = LightningModule
  utilities = types.ModuleType("pytorch_lightning.utilities")
  distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
  distributed.rank_zero_info = lambda *a, **k: None
  pl.utilities, utilities.distributed = utilities, distributed

  timm = types.ModuleType("timm")
  models = types.ModuleType("timm.models")
  layers = types.ModuleType("timm.models.layers")
  reg = types.ModuleType("timm.models.registry")

  class DropPath(torch.nn.Module):
    def __init__(self, p):
      raise RuntimeError("the fixture builds VLMo with drop_path_rate=0; DropPath is not stubbed")

  layers.DropPath = DropPath
  layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
  layers.trunc_normal_ = lambda t, std=1.0: torch.nn.init.trunc_normal_(t, std=std)

  def register_model(fn):
    registry[fn.__name__] = fn
    return fn

  def create_model(name, pretrained=False, **kwargs):
    # timm drops None-valued keyword arguments before calling the model function.
    return registry[name](pretrained=pretrained, **{k: v for k, v in kwargs.items()
                                                    if v is not None})

  reg.register_model = register_model
  models.create_model, models.layers, models.registry = create_model, layers, reg
  timm.models = models
  sys.modules.update({
      "pytorch_lightning": pl, "pytorch_lightning.utilities": utilities,
      "pytorch_lightning.utilities.distributed": distributed, "timm": timm,
      "timm.models": models, "timm.models.layers": layers, "timm.models.registry": reg})
  return register_model


def import_official(unilm: str, scratch: str):
  package = os.path.join(scratch, "vlmo", "modules")
  os.makedirs(package)
  open(os.path.join(scratch, "vlmo", "__init__.py"), "w").close()
  open(os.path.join(package, "__init__.py"), "w").close()
  for name in OFFICIAL_FILES:
    source = read_official(unilm, name)
    if name == "vlmo_module.py":
      source = source.replace("img.get_device()", "img.device")
    with open(os.path.join(package, name), "w") as f:
      f.write(source)
  with open(os.path.join(package, "vlmo_utils.py"), "w") as f:
    f.write("def set_metrics(pl_module):\n  pass\n")
  sys.path.insert(0, scratch)
  import vlmo.modules.multiway_transformer as multiway_transformer
  import vlmo.modules.vlmo_module as vlmo_module
  return multiway_transformer, vlmo_module


def vlmo_config(arch: str, image_size: int, vocab_size: int, max_text_len: int,
                max_text_len_of_initckpt: int, drop_path_rate: float) -> dict:
  """The official config's fields VLMo's module reads, for ITC + ITM + MLM (stage 3)."""
  return dict(image_size=image_size, model_arch=arch, drop_path_rate=drop_path_rate,
              max_text_len=max_text_len, max_text_len_of_initckpt=max_text_len_of_initckpt,
              vocab_size=vocab_size, load_path="", test_only=False,
              loss_names=dict(itm=1, itc=1, mlm=1, textmlm=0, vqa=0, nlvr2=0, irtr=0))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--unilm", required=True, help="microsoft/unilm git dir or work tree")
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument("--check", default="", help="instead: load this .safetensors (e.g. "
                      "`python -m coca_jax.interop.vlmo export` of the tiny model) into the "
                      "official tiny module with load_state_dict(strict=True)")
  args = parser.parse_args()
  import torch
  from safetensors.torch import save_file

  register_model = install_stubs()
  scratch = tempfile.mkdtemp(prefix="vlmo_official_")
  multiway_transformer, vlmo_module = import_official(args.unilm, scratch)

  t = TINY

  @register_model
  def vlmo_tiny_patch8(pretrained=False, **kwargs):
    img_size = kwargs.pop("img_size", t["image_size"])
    return multiway_transformer.MultiWayTransformer(
        img_size=img_size, patch_size=t["patch_size"], embed_dim=t["width"], depth=t["depth"],
        num_heads=t["heads"], mlp_ratio=4, qkv_bias=True, vlffn_start_layer_index=t["vlffn_start"],
        **kwargs)

  if args.check:
    from safetensors.torch import load_file
    model = vlmo_module.VLMo(vlmo_config(
        "vlmo_tiny_patch8", t["image_size"], t["vocab_size"], t["max_text_len"],
        t["max_text_len_of_initckpt"], 0.0))
    model.load_state_dict(load_file(args.check), strict=True)
    print(f"{args.check}: loaded into the official module with strict=True")
    return

  # VLMo-Base at full size: only its parameter count is kept (drop_path_rate 0: see above).
  base = vlmo_module.VLMo(vlmo_config("vlmo_base_patch16", 224, 30522, 40, 196, 0.0))
  base_parameters = sum(p.numel() for p in base.parameters())
  base_keys = {k: list(v.shape) for k, v in base.state_dict().items()}
  del base

  torch.manual_seed(0)
  config = vlmo_config("vlmo_tiny_patch8", t["image_size"], t["vocab_size"], t["max_text_len"],
                       t["max_text_len_of_initckpt"], 0.0)
  model = vlmo_module.VLMo(config).eval()
  with torch.no_grad():  # Every parameter away from its initial value (LN 1/0, gamma 0.1, ...).
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))

  batch_size, length = 2, t["max_text_len"]
  rng = np.random.default_rng(0)
  image = rng.normal(size=(batch_size, t["image_size"], t["image_size"], 3)).astype(np.float32)
  # [CLS]=2 .. [SEP]=3, PAD=0; the second text fills every position.
  text = np.zeros((batch_size, length), np.int64)
  text[0, :5] = [2, 11, 12, 13, 3]
  text[1, :] = [2] + list(rng.integers(5, t["vocab_size"], length - 2)) + [3]
  mlm_text = text.copy()
  mlm_text[0, 2] = mlm_text[1, 4] = 4  # [MASK]
  # The collator's labels: the original token where picked (here the two [MASK]s and one kept
  # token), -100 elsewhere.
  mlm_labels = np.full_like(text, -100)
  for row, col in ((0, 2), (1, 4), (1, 6)):
    mlm_labels[row, col] = text[row, col]
  masks = (text != 0).astype(np.int64)
  to_torch = lambda a: torch.from_numpy(a)
  batch = {"image": [to_torch(image.transpose(0, 3, 1, 2).copy())],
           "text_ids": to_torch(text), "text_labels": to_torch(np.full_like(text, -100)),
           "text_masks": to_torch(masks), "text_ids_mlm": to_torch(mlm_text),
           "text_labels_mlm": to_torch(mlm_labels)}
  with torch.no_grad():
    image_out = model.infer_image(batch)
    text_out = model.infer_text(batch)
    fused = model.infer(batch)
    itm_logits = model.itm_score(fused["cls_feats"])
    fused_mlm = model.infer(batch, mask_text=True)
    fused_mlm_logits = model.mlm_score(fused_mlm["text_feats"])
    text_mlm = model.infer_text_mlm(batch, mask_text=True)
    text_mlm_logits = model.mlm_score(text_mlm["text_feats"])
    # objectives.compute_mlm / compute_textonly_mlm's cross-entropy (compute_mlm then scales
    # it by 0.25, our config.loss.mlm_weight).
    vocab = t["vocab_size"]
    mlm_loss = lambda logits, out: torch.nn.functional.cross_entropy(
        logits.view(-1, vocab), out["text_labels"].view(-1), ignore_index=-100)
    fused_mlm_loss = mlm_loss(fused_mlm_logits, fused_mlm)
    text_mlm_loss = mlm_loss(text_mlm_logits, text_mlm)
  np_ = lambda x: x.detach().float().numpy()
  outputs = dict(
      image=image, text=text.astype(np.int32), mlm_text=mlm_text.astype(np.int32),
      mlm_labels=mlm_labels.astype(np.int32), fused_mlm_loss=np_(fused_mlm_loss),
      text_mlm_loss=np_(text_mlm_loss),
      image_embed=np_(image_out["cls_feats"]), image_vl_embed=np_(image_out["cls_vlffn_feats"]),
      image_tokens=np_(image_out["image_feats"]),
      text_embed=np_(text_out["cls_feats"]), text_vl_embed=np_(text_out["cls_vlffn_feats"]),
      text_tokens=np_(text_out["text_feats"]),
      fused_text_tokens=np_(fused["text_feats"]), fused_image_tokens=np_(fused["image_feats"]),
      fused_pooled=np_(fused["cls_feats"]), itm_logits=np_(itm_logits),
      fused_mlm_logits=np_(fused_mlm_logits), text_mlm_logits=np_(text_mlm_logits),
      logit_scale=np_(model.logit_scale.exp()), logit_vl_scale=np_(model.logit_vl_scale.exp()))
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(args.out, "vlmo_tiny.safetensors"))
  np.savez_compressed(os.path.join(args.out, "vlmo_tiny_outputs.npz"), **outputs)
  info = dict(tiny=dict(t, drop_path_rate=0.0),
              parameters=sum(p.numel() for p in model.parameters()),
              state_dict={k: list(v.shape) for k, v in state.items()},
              vlmo_base=dict(parameters=base_parameters, state_dict=base_keys),
              torch=torch.__version__,
              transformers=__import__("transformers").__version__)
  with open(os.path.join(args.out, "vlmo_tiny.json"), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)
  print(f"official tiny VLMo: {info['parameters']} parameters; VLMo-Base {base_parameters}")


if __name__ == "__main__":
  main()
