"""Grounding pretraining (sim/mjx/grounding.py): scenes, targets, images, checkpoint, errors.

References: the named block's target projected through C MuJoCo's own camera pose (mj_forward)
lands on that block in the JAX renderer's segmentation; token tables against the training
pipeline's Tokenize; the written .npz against the policy's parameter tree.
"""
import json
import os

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
import pytest

from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.mjx import grounding
from m2vla_jax.sim.mjx import render as render_lib
from m2vla_jax.sim.mjx import scene as scene_lib
from m2vla_jax.sim.mjx import tasks
from m2vla_jax.training import config_base
from m2vla_jax.text import tokenizers
import support

CONFIG = os.path.join(str(support.CONFIGS), "mjx.py")
WORDS = tokenizers.words_spec(i.text for t in tasks.TASKS for i in tasks.vocabulary(t))


def _settings(**kw):
  base = dict(vlm="tiny", vlm_overrides=(("max_text_tokens", 16), ("num_queries", 4)),
              tokenizer=WORDS, max_tokens=16, tasks=tasks.TASKS, cameras=("table",), image_size=32,
              steps=2, batch_size=4, lr=1e-3, seed=0)
  return grounding.Settings(**{**base, **kw})


def test_instruction_table_matches_the_training_tokenizer():
  table = grounding.instruction_table(tasks.TASKS, WORDS, 16)
  tokenize = tokenizers.Tokenize(tokenizers.make_tokenizer(WORDS), 16)
  assert table["tokens"].shape == (27, 16) and table["block"].shape == (27,)
  for k, text in enumerate(table["text"]):
    tokens, mask = tokenize(str(text))
    np.testing.assert_array_equal(table["tokens"][k], tokens)
    np.testing.assert_array_equal(table["token_mask"][k], mask)
    task = tasks.TASKS[k // 9]
    assert tasks.parse(task, str(text)).block == table["block"][k]


def _project(model, data, camera, point, size):
  """(row, col) of a world point in MuJoCo's camera image (camera looks along -z, +y up)."""
  pos, mat = data.cam_xpos[camera], data.cam_xmat[camera].reshape(3, 3)
  x, y, z = mat.T @ (point - pos)
  half = np.tan(np.deg2rad(model.cam_fovy[camera]) / 2)
  col = (x / -z / half + 1) * size / 2
  row = (1 - y / -z / half) * size / 2
  return int(np.floor(row)), int(np.floor(col))


def test_named_block_target_is_where_the_renderer_draws_that_block():
  scene = scene_lib.load()
  model = scene.model
  cam = scene.camera_ids["table"]
  size, n = 32, 48
  keys = jax.random.split(jax.random.key(3), n)
  blocks = jnp.arange(n, dtype=jnp.int32) % scene_lib.NUM_BLOCKS
  qpos, goal = jax.jit(jax.vmap(lambda k, b: grounding.random_scene(scene, k, b)))(keys, blocks)
  target = jax.vmap(lambda q, g, b: grounding.targets(scene, q, g, b))(qpos, goal, blocks)
  from mujoco import mjx
  data0 = mjx.make_data(scene.mjx_model)
  seg = jax.jit(jax.vmap(lambda q, g: render_lib.render(
      scene, data0.replace(qpos=q, mocap_pos=g[None], mocap_quat=jnp.array([[1.0, 0, 0, 0]])),
      ("table",), size, size)["seg"][0]))(qpos, goal)
  qpos, goal, target, seg = map(np.asarray, (qpos, goal, target, seg))
  hits, in_hand, on_goal = 0, 0, 0
  for i in range(n):
    b = int(blocks[i])
    named = target[i, :3] / grounding.TARGET_SCALE
    # the named columns are that colour's block, also in the colour-indexed columns
    np.testing.assert_allclose(named, qpos[i, scene.block_qpos[b, :3]], atol=1e-6)
    np.testing.assert_allclose(target[i, 8 + 2 * b:10 + 2 * b], target[i, :2], atol=1e-6)
    np.testing.assert_allclose(target[i, 3:5] / grounding.TARGET_SCALE, goal[i, :2], atol=1e-6)
    hand = qpos[i, scene_lib.HAND_QPOS]
    in_hand += np.allclose(named, hand + [0, 0, 0.015], atol=1e-6)
    on_goal += np.allclose(named[:2], goal[i, :2], atol=1e-6)
    d = mujoco.MjData(model)
    d.qpos[:] = qpos[i]
    d.mocap_pos[0] = goal[i]
    mujoco.mj_forward(model, d)
    r, c = _project(model, d, cam, named, size)
    window = seg[i, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
    hits += bool((window == scene.block_geoms[b]).any())
  # the block centre projects onto its own pixels unless the hand hides it
  assert hits >= 0.85 * n, f"named block drawn at its target in {hits}/{n} scenes"
  # scene mix: P_IN_HAND 0.25, P_ON_GOAL 0.15 (binomial, n=48: loose bounds)
  assert 4 <= in_hand <= 22 and 1 <= on_goal <= 16, (in_hand, on_goal)


def test_sample_batch_shapes_and_named_columns():
  scene = scene_lib.load()
  table = {k: jnp.asarray(v) for k, v in grounding.instruction_table(
      ("pick_lift", "place_on_target"), WORDS, 16).items() if k != "text"}
  b = jax.jit(lambda r: grounding.sample_batch(scene, table, r, 6, ("table", "wrist"), 32))(
      jax.random.key(0))
  assert b["images"].shape == (6, 2, 32, 32, 3) and b["images"].dtype == jnp.uint8
  assert b["image_mask"].shape == (6, 2) and bool(b["image_mask"].all())
  # two views of one scene: the wrist camera does not repeat the table camera's image
  assert np.abs(np.asarray(b["images"][:, 0], int) - np.asarray(b["images"][:, 1], int)).mean() > 5
  assert b["targets"].shape == (6, len(grounding.TARGETS))
  assert b["tokens"].shape == (6, 16) and bool(b["token_mask"][:, 0].all())
  named = np.asarray(table["block"])[np.asarray(b["instruction"])]
  t = np.asarray(b["targets"])
  for i, k in enumerate(named):
    np.testing.assert_allclose(t[i, 8 + 2 * k:10 + 2 * k], t[i, :2], atol=1e-6)


def test_errors_cm_scores_positions_in_cm():
  n = len(grounding.TARGETS)
  target = np.zeros((2, n), np.float32)
  pred = target.copy()
  pred[:, 0] += 0.001 * grounding.TARGET_SCALE      # named_x 1 mm off (metres x TARGET_SCALE)
  pred[1, 3] += 0.004 * grounding.TARGET_SCALE      # goal_x 4 mm off in the second example
  e = grounding.errors_cm(jnp.asarray(pred), jnp.asarray(target))
  np.testing.assert_allclose(float(e["named_block_xy"]), 0.05, rtol=1e-5)   # (0.1 + 0) / 2 cm
  np.testing.assert_allclose(float(e["goal_xy"]), 0.1, rtol=1e-5)           # 0.4 cm / 4 entries
  assert float(e["hand_xyz"]) == 0.0


def test_pretrain_writes_a_backbone_the_policy_loads_and_is_cached(tmp_path, monkeypatch):
  from m2vla_jax.policies import m2vla
  from m2vla_jax.training import pretrained
  c = config_base.load_config_file(CONFIG).get_config(
      f"vlm=tiny,ground=2,freeze_vlm=True,data_dir={tmp_path}")
  assert os.path.basename(c.init.checkpoint) == (
      grounding.settings_from_config(c).cache_name() + ".npz")
  # batch 4 instead of the config's 128: fast; its own file
  import dataclasses
  settings = dataclasses.replace(grounding.settings_from_config(c), batch_size=4)
  c.unlock()
  c.init.checkpoint = str(tmp_path / (settings.cache_name() + ".npz"))
  report = grounding.pretrain(settings, c.init.checkpoint, log_every=1, eval_size=8)
  assert [h["step"] for h in report["history"]] == [1, 2]
  assert np.isfinite(report["final"]["named_block_xy"])
  assert json.load(open(c.init.checkpoint + ".json"))["spec"]["targets"] == list(grounding.TARGETS)
  # every written member is a parameter of the policy's backbone, with its shape
  policy = m2vla.M2VLA(c.model)
  batch = {"observation": {"images": np.zeros((1, 1, 32, 32, 3), np.uint8),
                           "image_mask": np.ones((1, 1), bool), "state": np.zeros((1, 4), np.float32),
                           "tokens": np.ones((1, 16), np.int32), "token_mask": np.ones((1, 16), bool)},
           "actions": np.zeros((1, 8, 4), np.float32), "action_mask": np.ones((1, 8), bool),
           "frame_id": np.zeros((1,), np.int32)}
  shapes = jax.eval_shape(lambda: policy.init(jax.random.key(0), batch)[0])
  from m2vla_jax.core import tree_util
  flat = {k: v.shape for k, v in tree_util.flatten(shapes).items()}
  loaded = pretrained.load_init_checkpoint(c)
  vlm_keys = {k for k in flat if k.startswith("vlm/")}
  assert set(loaded) == vlm_keys                       # img, llm and the query tokens
  assert all(loaded[k].shape == flat[k] for k in loaded)
  # second call: cached, nothing runs
  assert grounding.ensure_pretrained(settings, c.init.checkpoint) is None
  # a settings change is a different file, named by the scheme every simulator cache uses
  assert _settings(steps=3).cache_name() != _settings().cache_name()
  s = _settings()
  assert s.cache_name() == demo_cache.cache_name(s.cache_name().rsplit("_", 1)[0], s.spec())
  # a file whose report lacks the spec (an interrupted write, or an old cache) is trained again
  report_path = c.init.checkpoint + ".json"
  saved = json.load(open(report_path))
  json.dump({k: v for k, v in saved.items() if k != "spec"}, open(report_path, "w"))
  monkeypatch.setattr(grounding, "pretrain", lambda s, path: {"trained": (s, path)})
  assert grounding.ensure_pretrained(settings, c.init.checkpoint) == {"trained": (settings, c.init.checkpoint)}
  saved["spec"]["steps"] += 1                          # another spec beside the file: trained again
  json.dump(saved, open(report_path, "w"))
  assert grounding.ensure_pretrained(settings, c.init.checkpoint) is not None


def test_errors_name_the_field(tmp_path):
  with pytest.raises(ValueError, match=r"grounding cameras \(config.mjx.cameras\)=\('table', 'top'\): camera 'top' is unknown"):
    _settings(cameras=("table", "top"))
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    _settings(steps=0)
  with pytest.raises(ValueError, match="takes 32px images but config.mjx.image_size=64"):
    grounding.pretrain(_settings(image_size=64), str(tmp_path / "x.npz"))
  from m2vla_jax.sim.mjx import workflow
  c = config_base.load_config_file(CONFIG).get_config(f"ground=5,data_dir={tmp_path}")
  c.unlock()
  c.init.checkpoint = str(tmp_path / "other.npz")
  with pytest.raises(ValueError, match=r"is not the file of these settings"):
    workflow.prepare_backbone(c)
