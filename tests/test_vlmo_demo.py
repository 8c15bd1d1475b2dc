"""experiments/demo.py:vlmo, VLMo's stages at the demo's scale: stage 1 trains BEiT's masked
image modelling on the scenes' images alone, moving only the image side and its MIM head;
stage 2 starts from it and trains only the text side VLMo's stage 2 trains, on the demo's
captions built as a text corpus; stage 3 starts from stage 2's parameters and trains ITC +
VL-ITC + ITM + MLM on the scenes, evaluated zero-shot and by retrieval (no captioning: the BERT
text encoder cannot caption)."""

import os
import re

import jax
import numpy as np
import pytest

from coca_jax.core import config as config_lib
from coca_jax.core import recipes
from coca_jax.data import prepare
from coca_jax.data import sources
from coca_jax.training import loop
from coca_jax.training import optim
from coca_jax.training import step as step_lib
from conftest import REPO


def _config(arg: str):
  config = config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:" + arg))
  config_lib.validate(config, num_devices=jax.device_count())
  return config


def _flat(params) -> dict:
  return dict(zip(jax.tree.leaves(optim.param_paths(params)),
                  (np.asarray(x) for x in jax.tree.leaves(jax.device_get(params)))))


def _train(config, workdir):
  """The Trainer's parts as `run` calls them; (initial parameters, final parameters, results)."""
  os.makedirs(workdir, exist_ok=True)
  trainer = loop.Trainer(config, workdir, step_lib.setup(config), loop.TrainOptions())
  try:
    trainer.restore_or_init()
    initial = _flat(trainer.state.params)
    trainer.compile()
    results = trainer.loop_and_finish()
    return initial, _flat(trainer.state.params), results
  finally:
    trainer.close()


def test_vlmo_demo_three_stages_each_start_from_the_last(tmp_path):
  stage1_dir, stage2_dir, stage3_dir = (str(tmp_path / f"stage{i}") for i in (1, 2, 3))
  config1 = _config("vlmo,smoke,stage=1")
  assert "text" not in step_lib.dummy_batch(config1, 2)  # Images alone.
  initial1, final1, results1 = _train(config1, stage1_dir)
  assert results1 == {}  # Images only: no image-text evals.
  # Stage 1 moved the image side (BEiT's parameters) and the MIM head, nothing else: no text
  # embedding, L-FFN, projection or pooler.
  moved1 = {p for p in final1 if not np.array_equal(final1[p], initial1[p])}
  beit = re.compile(r"^(patch_embed/|image_cls_token$|image_mask_token$|mim_head/|final_norm/|"
                    r"relative_position_bias$|layers_\d+/(ln_attention|attention|ffn_image)/|"
                    r"layers_\d+/layer_scale_(attention|ffn)$)")
  assert moved1 and all(beit.match(p) for p in moved1), sorted(moved1)
  assert {"patch_embed/kernel", "mim_head/kernel", "image_mask_token"} <= moved1
  assert any("/ffn_image/" in p for p in moved1) and any("/attention/" in p for p in moved1)
  # The codebook was fitted into the workdir and recorded in its config.
  assert os.path.exists(os.path.join(stage1_dir, "visual_codebook.npy"))
  with open(os.path.join(stage1_dir, "metrics.jsonl")) as f:
    text = f.read()
  assert '"mim_accuracy"' in text and '"mim_patches"' in text and '"contrastive' not in text

  config2 = _config(f"vlmo,smoke,stage=2,init={stage1_dir}")
  initial2, final2, results2 = _train(config2, stage2_dir)
  assert results2 == {}  # Texts only: no image-text evals.
  # Stage 2 starts from every stage-1 parameter it has (all but the MIM head and [MASK]).
  shared = set(final1) & set(initial2)
  assert shared == set(final1) - {p for p in final1 if p.startswith("mim_head/")} - {
      "image_mask_token"}
  for path in shared:
    np.testing.assert_array_equal(initial2[path], final1[path], err_msg=path)

  # Stage 2's corpus: the demo's train captions, built as a text dataset (no images), beside
  # the scenes stage 1 built.
  data_dir = os.path.join(stage1_dir, "tensorflow_datasets")
  corpus = sources.open_source(prepare.DEMO_TEXT_NAME, data_dir, "train", decode_images=False)
  scenes = sources.open_source(prepare.DEMO_NAME, data_dir, "train", decode_images=False)
  assert "image" not in corpus[0]
  assert len(corpus) == sum(len(scenes[i]["captions"]) for i in range(len(scenes)))

  # Only what VLMo's stage 2 trains moved: the text embeddings, the L-FFNs, the MLM head, the
  # relative position table and the final norm; the image side and attention stay as stage 1
  # left them.
  frozen = [re.compile(p) for p in recipes.VLMO_STAGE2_FROZEN]
  moved = {p for p in final2 if not np.array_equal(final2[p], initial2[p])}
  assert moved and not any(f.search(p) for p in moved for f in frozen)
  assert {p.split("/")[0] for p in moved} >= {"token_embed", "mlm", "final_norm", "layers_0"}
  assert all("/ffn_text/" in p for p in moved if p.startswith("layers_"))
  assert not any("/attention/" in p or "/ffn_image/" in p for p in moved)
  with open(os.path.join(stage2_dir, "metrics.jsonl")) as f:
    assert '"mlm_accuracy"' in f.read()

  config3 = _config(f"vlmo,smoke,init={stage2_dir}")
  initial3, _, results3 = _train(config3, stage3_dir)
  # Stage 3 starts from every stage-2 parameter; only the VL-FFN, its ITC pair and the ITM
  # head are new (VLMo's stage-2 module has none of them either).
  for path, value in final2.items():
    np.testing.assert_array_equal(initial3[path], value, err_msg=path)
  new = set(initial3) - set(final2)
  assert {p.split("/")[0] for p in new} >= {"layers_1", "image_vl_projection", "itm_head"}
  assert all(re.search(r"^layers_1/ffn_fusion/|_vl_projection/|^logit_vl_scale$|^itm_", p)
             for p in new), new
  assert {"eval/zeroshot_top1", "eval/i2t_recall@1", "eval/t2i_recall@1"} <= set(results3)
  assert not any("caption" in k or "cider" in k.lower() for k in results3)
  with open(os.path.join(stage3_dir, "metrics.jsonl")) as f:
    text = f.read()
  for name in ("mlm_accuracy", "itm_loss", "vl_contrastive_loss", "contrastive_loss"):
    assert f'"{name}"' in text


def test_vlmo_demo_stage1_starts_from_scratch():
  with pytest.raises(ValueError, match="stage=1 starts from the random initialisation"):
    config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:vlmo,stage=1,init=/w"))
