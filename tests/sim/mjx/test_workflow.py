"""configs/mjx.py and the MJX workflow's config checks (fast; the end-to-end run is in docs/results/mjx_runs.md).

Reference for the dataset name: the demo spec it hashes, compared field by field with the config.
"""
import json
import os
import pathlib

import pytest

from m2vla_jax.data import loader
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.mjx import experts
from m2vla_jax.sim.mjx import workflow
from m2vla_jax.training import config_base
from m2vla_jax.text import tokenizers
import support

CONFIG = os.path.join(str(support.CONFIGS), "mjx.py")


def _config(arg=None):
  return config_base.load_config_file(CONFIG).get_config(arg)


def _spec(c):
  return experts.demo_spec(**workflow._demo_args(c.mjx))  # pylint: disable=protected-access


def test_config_is_consistent_and_short_args_apply():
  c = _config("steps=7,episodes=3,eval_episodes=2,execute=4,c_eval=False")
  assert c.total_steps == 7 and c.mjx.episodes_per_task == 3
  assert c.mjx.eval.episodes_per_task == 2 and c.mjx.eval.execute_steps == 4
  assert not c.mjx.eval.c_mujoco
  assert c.data.pipeline.datasets == c.mjx.dataset_name
  assert c.mjx.cameras == ("table",)
  # readable prefix (tasks, cameras, size, demos per task) + hash of the spec
  assert c.mjx.dataset_name == "mjx_pick-push-place_table_32px_n3_" + demo_cache.digest(_spec(c))
  assert _spec(c) == {"simulator": "mjx", "experts_version": experts.VERSION,
                      "tasks": ["pick_lift", "push_to_target", "place_on_target"],
                      "episodes_per_task": 3, "horizon": c.mjx.demo_horizon, "seed": 0,
                      "image_size": 32, "cameras": ["table"], "noise": 0.3, "layout_repeats": 9,
                      "post_success_steps": 10, "post_success_tasks": ["place_on_target"],
                      "image_encoding": "png"}
  assert tuple(c.data.pipeline.image_size) == (c.mjx.image_size,) * 2
  # one token per word (the colour is one token, as in Gemma's vocabulary): 16 tokens in both the
  # pipeline and the tiny VLM, every id inside the tiny Gemma's 128
  assert c.data.tokenizer.startswith("words:") and "red" in c.data.tokenizer.split(",")
  assert loader.pipeline_config(c).max_tokens == c.model.vlm_overrides.max_text_tokens == 16
  assert tokenizers.make_tokenizer(c.data.tokenizer).vocab <= 128
  # bytes: 32 tokens (the instructions differ after 15 characters)
  b = _config("tokenizer=bytes")
  assert b.data.tokenizer == "bytes_mod:128"
  assert loader.pipeline_config(b).max_tokens == b.model.vlm_overrides.max_text_tokens == 32
  assert workflow._check(c) is c.mjx  # pylint: disable=protected-access
  # every setting that changes the recorded data is a different cache entry: the demo count,
  # the noise, the post-success steps and which tasks keep them (by default 10, place only)
  assert c.mjx.demo_post_success_steps == 10
  assert c.mjx.demo_post_success_tasks == ("place_on_target",)
  others = [_config(f"episodes=3,{a}") for a in (
      "episodes=4", "noise=0.2", "repeats=18", "post_tasks=", "post=0",
      "post=5,post_tasks=place_on_target+pick_lift")]
  assert len({c.mjx.dataset_name} | {o.mjx.dataset_name for o in others}) == 1 + len(others)
  assert _spec(others[3])["post_success_tasks"] == list(c.mjx.tasks)
  assert (_spec(others[4])["post_success_steps"], _spec(others[4])["post_success_tasks"]) == (0, [])
  # no trained task keeping post-success steps records what 0 steps record: one cache entry
  pick = _config("tasks=pick_lift")
  assert pick.mjx.demo_post_success_tasks == () and _spec(pick)["post_success_steps"] == 0
  assert pick.mjx.dataset_name == _config("tasks=pick_lift,post=0").mjx.dataset_name
  assert workflow._check(pick) is pick.mjx  # pylint: disable=protected-access
  # settings that do not change the data (training, evaluation) leave the name alone
  assert _config("episodes=3,steps=9,eval_episodes=3,lr=0.01").mjx.dataset_name == c.mjx.dataset_name
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
  assert _config("freeze_queries=True").model.trainable == [("vlm/.*", False), (".*", True)]


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
  # a demo setting edited by hand: the name no longer names the data, so the cache cannot be used
  c = _config()
  c.unlock()
  c.mjx.demo_noise = 0.1
  with pytest.raises(ValueError, match=r"config.mjx.dataset_name='mjx_pick-push-place_table_32px_"
                                       r"n600_[0-9a-f]{10}' does not match the demonstration settings"):
    workflow._check(c)  # pylint: disable=protected-access
  c = _config()
  c.unlock()
  del c["mjx"]
  with pytest.raises(ValueError, match="no 'mjx' section"):
    workflow.prepare_data(c)
  # 16 byte tokens: pick_lift's and place_on_target's "pick up the red block ..." collide
  c = _config("tokenizer=bytes")
  c.unlock()
  c.model.vlm_overrides.max_text_tokens = 16
  with pytest.raises(ValueError, match=r"more than the policy's text budget max_tokens=16; raise "
                                       r"config.model.vlm_overrides.max_text_tokens"):
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
  from m2vla_jax.sim.metaworld import workflow as metaworld_workflow  # pylint: disable=g-import-not-at-top
  assert train._workflow(_config()) is workflow.run  # pylint: disable=protected-access
  sim = config_base.load_config_file(str(pathlib.Path(CONFIG).with_name("sim.py"))).get_config()
  assert train._workflow(sim) is metaworld_workflow.run  # pylint: disable=protected-access
  debug = config_base.load_config_file(str(pathlib.Path(CONFIG).with_name("debug.py"))).get_config()
  assert train._workflow(debug) is None  # pylint: disable=protected-access


def test_prepare_data_records_once_per_spec_and_registers(tmp_path, monkeypatch):
  """The workflow's demo glue with the expert rollout replaced by a stand-in that writes the files
  a dataset consists of for the cache (the rollout itself is tested in tests/sim/mjx/test_rollout.py)."""
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_collect(out_dir, name, **kwargs):
    calls.append(kwargs)
    path = os.path.join(out_dir, name, demo_cache.VERSION)
    os.makedirs(path)
    open(os.path.join(path, "dataset_info.json"), "w").write("{}")
    rate = {"successes": 2, "episodes": 2, "success_rate": 1.0, "ci95": [0.34, 1.0]}
    return path, {"mean_success": 1.0, "mean_ci95": [0.51, 1.0], "episodes": 6,
                  "per_task": {t: dict(rate) for t in kwargs["tasks"]}}

  monkeypatch.setattr(experts, "collect_demos", fake_collect)
  c = _config(f"episodes=2,data_dir={tmp_path}")
  path, report = workflow.prepare_data(c)
  assert path == str(tmp_path / c.mjx.dataset_name / "1.0.0") and report["episodes"] == 6
  assert calls == [workflow._demo_args(c.mjx)]  # pylint: disable=protected-access
  assert json.load(open(os.path.join(path, demo_cache.SPEC_FILE))) == _spec(c)
  assert json.load(open(os.path.join(path, "mjx_demo_summary.json")))["mean_success"] == 1.0
  assert dict(oxe.get_spec(c.mjx.dataset_name).cameras) == {"primary": "image"}
  assert workflow.prepare_data(c) == (path, None) and len(calls) == 1        # cached


def test_a_config_names_at_most_one_simulator_workflow():
  from m2vla_jax.sim import workflows  # pylint: disable=g-import-not-at-top
  assert workflows.section({"model": {}}) is None and workflows.resolve({"model": {}}) is None
  assert not workflows.prepare_data({"model": {}})
  assert workflows.resolve({"mjx": {}}, "prepare_data") is workflow.prepare_data
  with pytest.raises(ValueError, match=r"sections \['sim', 'mjx'\]; a config runs one simulator"):
    workflows.section({"sim": {}, "mjx": {}})
