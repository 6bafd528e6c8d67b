"""configs/mjx.py and the MJX workflow's config checks (fast; the end-to-end run is in RESULTS.md).

Reference for the dataset name: the settings it must encode, compared field by field.
"""
import os
import pathlib

import pytest

from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.sim.mjx import workflow
from m2vla_jax.training import config_base
from m2vla_jax.text import tokenizers

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "mjx.py")


def _config(arg=None):
  return config_base.load_config_file(CONFIG).get_config(arg)


def test_config_is_consistent_and_short_args_apply():
  c = _config("steps=7,episodes=3,eval_episodes=2,execute=4,c_eval=False")
  assert c.total_steps == 7 and c.mjx.episodes_per_task == 3
  assert c.mjx.eval.episodes_per_task == 2 and c.mjx.eval.execute_steps == 4
  assert not c.mjx.eval.c_mujoco
  assert c.data.pipeline.datasets == c.mjx.dataset_name
  assert "n3" in c.mjx.dataset_name and c.mjx.cameras == ("table",) and "_table_" in c.mjx.dataset_name
  assert tuple(c.data.pipeline.image_size) == (c.mjx.image_size,) * 2
  # one token per word (the colour is one token, as in Gemma's vocabulary): 16 tokens in both the
  # pipeline and the tiny VLM, every id inside the tiny Gemma's 128
  assert c.data.tokenizer.startswith("words:") and "red" in c.data.tokenizer.split(",")
  assert c.data.pipeline.max_tokens == c.model.vlm_overrides.max_text_tokens == 16
  assert tokenizers.make_tokenizer(c.data.tokenizer).vocab <= 128
  # bytes: 32 tokens (the instructions differ after 15 characters)
  b = _config("tokenizer=bytes")
  assert b.data.tokenizer == "bytes_mod:128"
  assert b.data.pipeline.max_tokens == b.model.vlm_overrides.max_text_tokens == 32
  assert workflow._check(c) is c.mjx  # pylint: disable=protected-access
  # a different demo count is a different cache entry
  assert _config("episodes=4").mjx.dataset_name != c.mjx.dataset_name
  # so is a different number of post-success steps, and which tasks keep them: by default 10,
  # place only; every task keeps the name of the older caches, 0 steps (or no trained task
  # among post_tasks) no post part at all
  assert c.mjx.demo_post_success_steps == 10 and c.mjx.demo_post_success_tasks == ("place_on_target",)
  assert "_post10-place_" in c.mjx.dataset_name
  assert "_post10_" in _config("post_tasks=").mjx.dataset_name
  assert "_post" not in _config("post=0").mjx.dataset_name
  pick = _config("tasks=pick_lift")
  assert pick.mjx.demo_post_success_tasks == () and "_post" not in pick.mjx.dataset_name
  assert workflow._check(pick) is pick.mjx  # pylint: disable=protected-access
  assert "_post5-pick-place_" in _config("post=5,post_tasks=place_on_target+pick_lift").mjx.dataset_name
  with pytest.raises(ValueError, match=r"post_tasks names \['place'\]; use '\+'-separated names"):
    _config("post_tasks=place")
  hand_edited = _config()
  with hand_edited.unlocked():
    hand_edited.mjx.tasks = ("pick_lift",)
  with pytest.raises(ValueError, match=r"demo_post_success_tasks names \['place_on_target'\], not among"):
    workflow._check(hand_edited)  # pylint: disable=protected-access
  # a wrist camera: a second camera slot in the data, the model and the dataset name
  w = _config("cameras=table+wrist")
  assert w.mjx.cameras == ("table", "wrist") and "_table-wrist_" in w.mjx.dataset_name
  assert tuple(w.data.pipeline.cameras) == ("primary", "wrist") and w.model.num_cameras == 2
  assert workflow._check(w) is w.mjx  # pylint: disable=protected-access
  assert dict(workflow.dataset_spec("x", w.mjx.cameras).cameras) == {
      "primary": "image", "wrist": "wrist_image"}
  # another resolution: data, pipeline and the image tower follow; 32 px writes no override
  assert "image_size" not in c.model.vlm_overrides
  h = _config("image=64,vlm=tiny")
  assert "_64px_" in h.mjx.dataset_name and tuple(h.data.pipeline.image_size) == (64, 64)
  tower = vlm_lib.get_config(h.model.vlm, **h.model.vlm_overrides).img
  assert (tower.image_size, tower.num_patches) == (64, 16)
  assert "_64px_" in h.init.checkpoint and workflow._check(h) is h.mjx  # pylint: disable=protected-access
  # freeze_queries: nothing of the VLM trains
  assert _config("freeze_queries=True").trainable == [("vlm/.*", False), (".*", True)]


def test_config_errors_name_the_field():
  c = _config()
  c.unlock()
  c.data.pipeline.datasets = "other"
  with pytest.raises(ValueError, match="config.data.pipeline.datasets='other'"):
    workflow._check(c)  # pylint: disable=protected-access
  c = _config()
  c.unlock()
  c.mjx.eval.execute_steps = 9
  with pytest.raises(ValueError, match="execute_steps=9 exceeds"):
    workflow._check(c)  # pylint: disable=protected-access
  c = _config()
  c.unlock()
  c.mjx.tasks = ("pick_lift", "stack")
  with pytest.raises(ValueError, match="task='stack' is unknown"):
    workflow._check(c)  # pylint: disable=protected-access
  c = _config()
  c.unlock()
  c.model.num_cameras = 2
  with pytest.raises(ValueError, match=r"num_cameras=2 must be len\(config.mjx.cameras\)=1"):
    workflow._check(c)  # pylint: disable=protected-access
  c = _config()
  c.unlock()
  c.data.pipeline.cameras = ("primary", "wrist")
  with pytest.raises(ValueError, match=r"pipeline.cameras=\('primary', 'wrist'\) must be the slots"):
    workflow._check(c)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="camera 'top' is unknown"):
    _config("cameras=table+top")
  with pytest.raises(ValueError, match="no camera twice"):
    _config("cameras=table+table")
  c = _config()
  c.unlock()
  del c["mjx"]
  with pytest.raises(ValueError, match="no 'mjx' section"):
    workflow.prepare_data(c)
  # 16 byte tokens: pick_lift's and place_on_target's "pick up the red block ..." collide
  c = _config("tokenizer=bytes")
  c.unlock()
  c.data.pipeline.max_tokens = 16
  with pytest.raises(ValueError, match=r"more than config.data.pipeline.max_tokens=16"):
    workflow._check(c)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"tokenizer='sentencepiece'; use one of \('words', 'bytes'\)"):
    _config("tokenizer=sentencepiece")
  with pytest.raises(ValueError, match="unknown config argument 'demos'"):
    _config("demos=3")
  # 3 repeats over 3 tasks: each shared layout names one colour per task (the word is redundant)
  with pytest.raises(ValueError, match=r"demo_layout_repeats=3: .* one block only for "
                                       r"\['pick_lift', 'place_on_target', 'push_to_target'\]"):
    workflow._check(_config("repeats=3"))  # pylint: disable=protected-access
  # one task: 3 repeats give each layout all three colours
  one = _config("tasks=pick_lift,repeats=3")
  assert one.mjx.tasks == ("pick_lift",) and one.mjx.dataset_name.startswith("mjx_pick_")
  workflow._check(one)  # pylint: disable=protected-access
  for ok in (1, 9, 18):
    workflow._check(_config(f"repeats={ok}"))  # pylint: disable=protected-access


def test_the_train_entry_point_runs_each_configs_workflow():
  # `python -m m2vla_jax.train --config=configs/mjx.py` runs the MJX workflow (it used to fail with
  # 'unknown dataset'); Meta-World configs run theirs; plain configs train.
  from m2vla_jax import train  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim import workflow as metaworld_workflow  # pylint: disable=g-import-not-at-top
  assert train._workflow(_config()) is workflow.run  # pylint: disable=protected-access
  sim = config_base.load_config_file(str(pathlib.Path(CONFIG).with_name("sim.py"))).get_config()
  assert train._workflow(sim) is metaworld_workflow.run  # pylint: disable=protected-access
  debug = config_base.load_config_file(str(pathlib.Path(CONFIG).with_name("debug.py"))).get_config()
  assert train._workflow(debug) is None  # pylint: disable=protected-access
