"""Frozen-feature cache: cached stages equal the live pass, training from the cache equals training
without it, and a cache is reused only while its key (frozen weights, backbone, preprocessing, dataset
content, dtype) is unchanged; stale or invalid caches are rebuilt or turned off with a log line."""
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from m2vla_jax.core import tree_util
from m2vla_jax.data import oxe, testing
from m2vla_jax.data.writer import write_rlds_dataset
from m2vla_jax.models import vlm as vlm_lib
from m2vla_jax.policies import m2vla
from m2vla_jax.training import feature_cache
from m2vla_jax.training import trainer
from m2vla_jax.training import validation
import support

F = oxe.Field
NAME = "toy_feature_cache"


def _inputs(cfg, b=3, cams=2, t=6, seed=0):
  rng = np.random.default_rng(seed)
  h, w = vlm_lib.image_hw(cfg.img)
  images = rng.integers(0, 256, (b, cams, h, w, 3)).astype(np.uint8)
  image_mask = np.ones((b, cams), bool)
  image_mask[1, cams - 1] = cams == 1             # an absent camera (when there are two)
  tokens = rng.integers(0, cfg.llm.vocab_size, (b, t)).astype(np.int32)
  token_mask = np.arange(t)[None] < np.array([[2], [6], [4]])
  return images, image_mask, tokens, token_mask


def test_cached_stages_equal_the_full_pass():
  # The DINOv2 path has every stage (tower, projector, prefix, queries); SigLIP differs only in the
  # tower, whose output `image_features` returns as it is.
  cfg = vlm_lib.get_config("tiny_dinov2")
  model = vlm_lib.VLM(cfg)
  images, image_mask, tokens, token_mask = _inputs(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images, image_mask, tokens, token_mask)["params"]
  run = lambda *a, **kw: jax.jit(lambda p: model.apply({"params": p}, *a, **kw))(params)
  full = run(images, image_mask, tokens, token_mask)
  feats = run(images, method=vlm_lib.VLM.image_features)
  prefix = run(images, image_mask, tokens, token_mask, method=vlm_lib.VLM.prefix)
  from_feats = run(None, image_mask, tokens, token_mask, cached={"image_features": feats})
  from_prefix = run(None, image_mask, tokens, token_mask, cached=prefix)
  outputs = run(images, image_mask, tokens, token_mask, method=vlm_lib.VLM.outputs)
  from_outputs = run(None, image_mask, tokens, token_mask, cached=outputs)
  # Same float32 operations on the same values; only XLA's fusion may differ between the programs.
  for got in (from_feats, from_prefix, from_outputs):
    for k in ("visual", "query", "visual_mask", "query_mask", "mask", "positions"):
      np.testing.assert_allclose(np.asarray(got[k], np.float64), np.asarray(full[k], np.float64),
                                 atol=1e-5, rtol=1e-5, err_msg=k)
  assert "final" not in from_prefix and "text" not in from_prefix   # not cached, documented
  # The prefix cache is batch-major (one row per frame): [B, L, ...].
  assert prefix["prefix_visual"].shape[:2] == (3, cfg.llm.depth)
  # A cache built with another text length is refused, naming the cause.
  with pytest.raises(ValueError, match="max_tokens"):
    model.apply({"params": params}, None, image_mask, tokens[:, :4], token_mask[:, :4], cached=prefix)


def _policy(rules, msm=True, **vlm_overrides):
  return m2vla.M2VLA({"vlm": "tiny_dinov2", "vlm_overrides": vlm_overrides, "num_cameras": 1,
                      "trainable": rules, "state_dim": 3, "action_dim": 4, "horizon": 4,
                      "memory": {"size": 16}, "msm": msm})


@pytest.mark.parametrize("rules,overrides,stage", [
    ([("vlm/.*", False), (".*", True)], {}, "outputs"),
    ([("vlm/queries", True), ("vlm/.*", False), (".*", True)], {}, "prefix"),
    ([("vlm/queries", True), ("vlm/img_proj/.*", True), ("vlm/.*", False), (".*", True)], {},
     "image_features"),
    ([("vlm/queries", True), ("vlm/img/.*", True), ("vlm/.*", False), (".*", True)], {}, None),
    ([("vlm/queries", True), ("vlm/llm/.*", True), ("vlm/.*", False), (".*", True)], {},
     "image_features"),
    ([("vlm/queries", True), ("vlm/.*", False), (".*", True)], {"query_attention": "bidirectional"},
     "image_features"),
])
def test_cache_stage_is_the_deepest_frozen_one(rules, overrides, stage):
  policy = _policy(rules, **overrides)
  cfg = policy.vlm_config
  images, image_mask, tokens, token_mask = _inputs(cfg, cams=1)
  obs = {"images": images, "image_mask": image_mask[:, :1], "tokens": tokens, "token_mask": token_mask,
         "state": np.zeros((3, 3), np.float32)}
  params = jax.eval_shape(lambda r: policy.init(r, {"observation": obs})[0], jax.random.PRNGKey(0))
  assert policy.cache_stage(params) == stage


def test_choose_stage_turns_off_or_falls_back_with_a_reason():
  assert feature_cache.choose_stage("off", "prefix", augment=False)[0] is None
  stage, why = feature_cache.choose_stage("auto", "prefix", augment=True)
  assert stage is None and "augment" in why
  stage, why = feature_cache.choose_stage("auto", None, augment=False)
  assert stage is None and "trainable" in why
  stage, why = feature_cache.choose_stage("prefix", "image_features", augment=False)
  assert stage == "image_features" and "not frozen" in why
  assert feature_cache.choose_stage("image_features", "prefix", augment=False)[0] == "image_features"
  with pytest.raises(ValueError, match="feature_cache.stage"):
    feature_cache.choose_stage("everything", "prefix", augment=False)


def test_stale_reasons_name_what_changed():
  base = feature_cache.manifest_for(stage="prefix", weights="a", backbone="b",
                                    preprocessing={"image_size": [56, 56], "max_tokens": 16},
                                    fingerprint="f", dtype="float32", frames=10)
  assert feature_cache.stale_reasons(base, base) == []
  changed = dict(base, frozen_weights_sha256="z",
                 preprocessing={"image_size": [112, 112], "max_tokens": 16})
  reasons = feature_cache.stale_reasons(base, changed)
  assert reasons == ["the frozen weights", "the preprocessing (image_size)"]


# ------------------------------------------------------------------ end to end through the trainer
def _write(root, seed):
  # Only the dataset's version directory: the frozen-feature cache lives beside it.
  shutil.rmtree(os.path.join(root, NAME, "1.0.0"), ignore_errors=True)
  eps = testing.toy_episodes(4, [5, 7, 6, 8], seed=seed, task="pick", image_hw=(56, 56))
  write_rlds_dataset(eps, root, NAME, image_encoding="png", progress=False)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("rlds"))
  _write(root, seed=1)
  oxe.register(oxe.DatasetSpec(NAME, {"primary": "image"}, state=(F("observation/state"),),
                               action=(F("action", 0, 3), F("action", 3, 4, gripper=oxe.Gripper.OPEN_1))),
               overwrite=True)
  return root


def _train_config(root, stage, *, seed=0, trainable_extra=(), rules=None, **fields):
  c = support.debug_config(f"steps=4,batch=8,model=m2vla,data=rlds,data_dir={root}")
  rules = rules or [("vlm/queries", True), *trainable_extra, ("vlm/.*", False), (".*", True)]
  with c.unlocked():
    c.seed = seed
    c.model.vlm = "tiny_dinov2"
    c.model.num_cameras = 1
    c.model.state_dim = 3
    c.model.action_dim = 4
    c.model.frozen_dtype = "float32"
    c.model.trainable = rules
    c.data.pipeline.datasets = NAME
    c.data.pipeline.cameras = ("primary",)
    c.data.pipeline.image_size = (56, 56)
    c.data.pipeline.stats_dir = os.path.join(root, "stats")
    c.data.val_split = "train"
    c.checkpoint.every = 100
    c.feature_cache.stage = stage
    for k, v in fields.items():
      node, *path = k.split(".")
      target = c[node]
      for p in path[:-1]:
        target = target[p]
      if path:
        target[path[-1]] = v
      else:
        c[node] = v
  return c


def _losses(config, workdir):
  result = trainer.train(config, str(workdir))
  shutil.rmtree(workdir)
  return np.array([loss for _, loss in result["history"]])


def _first_attached_batch(config):
  """What `trainer.train` hands its step first: the data with the cache attached, or the data as it is."""
  validation.validate_config(config)
  data = trainer.build_data(config, "train")
  s = trainer.setup(config, next(data))
  data = feature_cache.attach(config, s.policy, s.state.params(), trainer.build_data(config, "train"))
  return next(data)


def _slot(root, stage):
  return os.path.join(root, NAME, "frozen_features", stage)


def test_training_from_the_cache_equals_training_without_it(data_root, tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="m2vla_jax.training.feature_cache")
  live = _losses(_train_config(data_root, "off"), tmp_path / "live")
  cached = _losses(_train_config(data_root, "auto"), tmp_path / "cached")
  # Identical batches and parameters; the cached prefix came from another XLA program (float32).
  np.testing.assert_allclose(cached, live, rtol=1e-4)
  manifest = json.loads(open(os.path.join(_slot(data_root, "prefix"), "manifest.json")).read())
  assert manifest["stage"] == "prefix" and manifest["frames"] == 26
  assert sorted(manifest["features"]) == ["prefix_key", "prefix_value", "prefix_visual"]
  assert "building (none yet)" in caplog.text


def test_a_cache_lives_while_its_key_is_unchanged(data_root, caplog):
  """Each step of a cache's life, through what the trainer calls (no training: the test above trains)."""
  caplog.set_level(logging.INFO, logger="m2vla_jax.training.feature_cache")
  shutil.rmtree(os.path.join(data_root, NAME, "frozen_features"), ignore_errors=True)
  f32 = _first_attached_batch(_train_config(data_root, "auto"))
  assert "building (none yet)" in caplog.text and "images" not in f32["observation"]
  features = f32["observation"]["frozen_features"]
  assert sorted(features) == ["prefix_key", "prefix_value", "prefix_visual"]

  caplog.clear()
  again = _first_attached_batch(_train_config(data_root, "auto"))
  assert "reusing 26 frames" in caplog.text and "building" not in caplog.text
  np.testing.assert_array_equal(again["frame_id"], f32["frame_id"])
  for k, v in features.items():
    np.testing.assert_array_equal(again["observation"]["frozen_features"][k], v, err_msg=k)

  caplog.clear()
  bf16 = _first_attached_batch(_train_config(data_root, "auto", **{"feature_cache.dtype": "bfloat16"}))
  assert "is stale (the storage dtype changed); rebuilding" in caplog.text
  for k, v in features.items():
    got = np.asarray(bf16["observation"]["frozen_features"][k], np.float32)
    # bfloat16 keeps 8 bits of mantissa: relative rounding error <= 2^-9 per element.
    np.testing.assert_allclose(got, v, rtol=2.0 ** -8, atol=1e-30, err_msg=k)
    assert not np.array_equal(got, v), k           # it really stored the rounded features

  caplog.clear()
  # Another backbone seed initialises other random frozen parts (the projector).
  _first_attached_batch(_train_config(data_root, "auto", **{"feature_cache.dtype": "bfloat16",
                                                            "model.backbone_seed": 7}))
  assert "is stale (the frozen weights changed); rebuilding" in caplog.text

  # An interrupted build (no manifest) is never read as a cache.
  os.remove(os.path.join(_slot(data_root, "prefix"), "manifest.json"))
  caplog.clear()
  _first_attached_batch(_train_config(data_root, "auto"))
  assert "building (none yet)" in caplog.text

  _write(data_root, seed=2)                # same name, other frames
  try:
    caplog.clear()
    _first_attached_batch(_train_config(data_root, "auto"))
    assert "the dataset's content" in caplog.text
  finally:
    _write(data_root, seed=1)

  caplog.clear()
  augmented = _first_attached_batch(_train_config(data_root, "auto", **{"data.pipeline.augment": True}))
  assert "frozen-feature cache off" in caplog.text and "augment" in caplog.text
  assert "frozen_features" not in augmented["observation"] and "images" in augmented["observation"]


@pytest.mark.parametrize("rules,stage", [
    # 'prefix' trains through the trainer in the test above.
    ([("vlm/queries", True), ("vlm/img_proj/.*", True), ("vlm/.*", False), (".*", True)], "image_features"),
    ([("vlm/.*", False), (".*", True)], "outputs"),
])
def test_loss_and_gradient_from_each_stage_equal_the_live_ones(rules, stage):
  # Without the memory: a smaller program to compile; the trainer test above keeps it on.
  policy = _policy(rules, msm=False)
  cfg = policy.vlm_config
  images, image_mask, tokens, token_mask = _inputs(cfg, cams=1, b=3)
  rng = np.random.default_rng(1)
  obs = {"images": images, "image_mask": image_mask, "tokens": tokens, "token_mask": token_mask,
         "state": rng.normal(size=(3, 3)).astype(np.float32)}
  batch = {"observation": obs, "actions": rng.normal(size=(3, 4, 4)).astype(np.float32),
           "action_mask": np.ones((3, 4), bool), "frame_id": np.arange(3, dtype=np.int32)}
  params, state = jax.jit(policy.init)(jax.random.PRNGKey(0), batch)
  assert policy.cache_stage(params) == stage
  feats = jax.jit(lambda p, o: policy.frozen_features(p, o, stage))(params, obs)
  cached_obs = {k: v for k, v in obs.items() if k != "images"}
  cached_obs["frozen_features"] = jax.device_get(feats)
  cached_batch = {**batch, "observation": cached_obs}
  value_and_grad = jax.value_and_grad(lambda p, b: policy.loss(p, state, b, jax.random.PRNGKey(3))[0])
  live_loss, live_g = jax.jit(value_and_grad)(params, batch)
  cached_loss, cached_g = jax.jit(value_and_grad)(params, cached_batch)
  np.testing.assert_allclose(float(cached_loss), float(live_loss), rtol=1e-5)
  trainable = tree_util.flatten(policy.frozen_mask(params))
  flat_live, flat_cached = tree_util.flatten(live_g), tree_util.flatten(cached_g)
  for path, trains in trainable.items():
    if trains:
      np.testing.assert_allclose(flat_cached[path], flat_live[path], rtol=1e-4, atol=1e-6, err_msg=path)
