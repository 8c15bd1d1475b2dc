"""experiments/demo.py:vlmo, VLMo's stages at the demo's scale: stage 2 trains only the text side
VLMo's stage 2 trains, on the demo's captions built as a text corpus; stage 3 starts from stage
2's parameters and trains ITC + VL-ITC + ITM + MLM on the scenes, evaluated zero-shot and by
retrieval (no captioning: the BERT text encoder cannot caption)."""

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


def test_vlmo_demo_stage2_trains_the_text_side_and_stage3_starts_from_it(tmp_path):
  stage2_dir, stage3_dir = str(tmp_path / "stage2"), str(tmp_path / "stage3")
  config2 = _config("vlmo,smoke,stage=2")
  initial2, final2, results2 = _train(config2, stage2_dir)
  assert results2 == {}  # Texts only: no image-text evals.

  # Stage 2's corpus: the demo's train captions, built as a text dataset (no images).
  data_dir = os.path.join(stage2_dir, "tensorflow_datasets")
  corpus = sources.open_source(prepare.DEMO_TEXT_NAME, data_dir, "train", decode_images=False)
  scenes = sources.open_source(prepare.DEMO_NAME, data_dir, "train", decode_images=False)
  assert "image" not in corpus[0]
  assert len(corpus) == sum(len(scenes[i]["captions"]) for i in range(len(scenes)))

  # Only what VLMo's stage 2 trains moved: the text embeddings, the L-FFNs, the MLM head, the
  # relative position table and the final norm; the image side and attention stay at stage 1's
  # stand-in (their initialisation).
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


def test_vlmo_demo_stage1_names_its_stand_in():
  with pytest.raises(ValueError, match="stand-in is the image side's random initialisation"):
    config_lib.load_config(os.path.join(REPO, "experiments", "demo.py:vlmo,stage=1"))
