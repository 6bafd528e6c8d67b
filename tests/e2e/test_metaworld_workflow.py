"""Meta-World default workflow: the raw-observation policy adapter and demos -> train -> report."""
import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import importlib.util  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.sim.common import policy_adapter as pa  # noqa: E402
from m2vla_jax.text import tokenizers  # noqa: E402
import support

ROOT = str(support.REPO)


def _stats(dim, lo, hi):
  lo, hi = np.asarray(lo, float), np.asarray(hi, float)
  mid = (lo + hi) / 2
  return {"mean": mid.tolist(), "std": ((hi - lo) / 4).tolist(), "q01": lo.tolist(),
          "q99": hi.tolist(), "min": lo.tolist(), "max": hi.tolist()}


STATE_LO, STATE_HI = [-0.5, 0.4, 0.0, 0.0], [0.5, 0.9, 0.3, 1.0]
ACTION_LO, ACTION_HI = [-1.0, -0.5, -0.8, -1.0], [1.0, 0.7, 0.6, 1.0]
STATISTICS = {"normalization": "bounds", "datasets": {"demos": {
    "dataset": "demos", "state": _stats(4, STATE_LO, STATE_HI),
    "action": _stats(4, ACTION_LO, ACTION_HI), "action_gripper_mask": [False] * 4}}}


class _EchoPolicy:
  """sample_actions = the normalized state repeated over the horizon (so outputs are checkable)."""

  def __init__(self, horizon=3, state_dim=6, action_dim=5):
    self.config = ml_collections.ConfigDict(dict(state_dim=state_dim))
    self.horizon, self.action_dim = horizon, action_dim

  def sample_actions(self, params, state, observation, rng):
    del params, state, rng
    s = observation["state"][:, :self.action_dim]
    s = jnp.pad(s, ((0, 0), (0, self.action_dim - s.shape[1])))
    return jnp.repeat(s[:, None], self.horizon, axis=1)


def _adapter(cameras=("primary",), image_size=(32, 32), policy=None):
  return pa.SimPolicyAdapter(policy or _EchoPolicy(), {}, {}, STATISTICS,
                             tokenizers.make_tokenizer("bytes_mod:128"), max_tokens=8,
                             image_size=image_size, cameras=cameras, state_dim=6)


def _obs(b=2, c=1, size=64, seed=0):
  rng = np.random.default_rng(seed)
  state = rng.uniform(STATE_LO, STATE_HI, (b, 4))
  return {"images": rng.integers(0, 256, (b, c, size, size, 3), dtype=np.uint8),
          "image_mask": np.ones((b, c), bool), "state": state,
          "instruction": ["close the drawer", "open the window"][:b] + ["x"] * max(0, b - 2)}


def test_adapter_shapes_normalization_and_actions_vs_numpy():
  policy = _EchoPolicy()
  adapter = _adapter(cameras=("primary", "wrist"), policy=policy)
  obs = _obs()
  actions = adapter(obs)
  model_obs = adapter.model_observation(obs)   # what the jitted policy was given
  assert actions.shape == (2, 3, 4) and actions.dtype == np.float64
  lo, hi = np.array(STATE_LO), np.array(STATE_HI)
  want_state = 2 * (obs["state"] - lo) / (hi - lo) - 1            # bounds normalization, float64
  np.testing.assert_allclose(np.asarray(model_obs["state"])[:, :4], want_state, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(model_obs["state"])[:, 4:], 0.0)
  # The echo policy returns the normalized state as a normalized action; unnormalizing with the
  # action bounds: a = (n + 1) / 2 * (q99 - q01) + q01.
  alo, ahi = np.array(ACTION_LO), np.array(ACTION_HI)
  want_actions = (want_state + 1) / 2 * (ahi - alo) + alo
  np.testing.assert_allclose(actions, np.repeat(want_actions[:, None], 3, axis=1), atol=1e-5)
  # Images: 64 -> 32 bilinear with half-pixel centers is exactly the 2x2 block mean (+-1 rounding).
  want_img = obs["images"][:, 0].reshape(2, 32, 2, 32, 2, 3).astype(float).mean(axis=(2, 4))
  got = np.asarray(model_obs["images"])
  assert got.shape == (2, 2, 32, 32, 3) and got.dtype == np.uint8
  assert np.abs(got[:, 0].astype(float) - want_img).max() <= 1.0
  # The wrist slot is not rendered by this simulator config: zeros, masked out.
  np.testing.assert_array_equal(np.asarray(model_obs["image_mask"]), [[True, False], [True, False]])
  assert not got[:, 1].any()
  # Tokens: BOS + UTF-8 bytes folded into [1, 128), truncated to 8 and right-padded.
  folded = tokenizers.make_tokenizer("bytes_mod:128")
  for row, text in enumerate(obs["instruction"]):
    ids = folded.encode(text)[:8]
    np.testing.assert_array_equal(np.asarray(model_obs["tokens"])[row, :len(ids)], ids)
    assert np.asarray(model_obs["token_mask"])[row].sum() == len(ids)


def test_adapter_action_round_trip_and_clipping():
  adapter = _adapter()
  rng = np.random.default_rng(1)
  a = rng.uniform(ACTION_LO, ACTION_HI, (5, 4, 4))
  np.testing.assert_allclose(adapter.unnormalize_actions(adapter.normalize_actions(a)), a,
                             atol=1e-5)  # float32 normalized values
  # Bounds normalization clips outside [q01, q99]: the round trip returns the bound.
  out = adapter.unnormalize_actions(adapter.normalize_actions(np.array([[5.0, -5.0, 0.0, 0.0]])))
  np.testing.assert_allclose(out[0, :2], [ACTION_HI[0], ACTION_LO[1]], atol=1e-5)


@pytest.mark.parametrize("mutate, match", [
    (lambda o: o.pop("instruction"), "missing \\['instruction'\\]"),
    (lambda o: o.update(images=o["images"].astype(np.float32)), "images"),
    (lambda o: o.update(images=o["images"][:, 0]), "images"),
    (lambda o: o.update(state=o["state"][:, :3]), "state"),
    (lambda o: o.update(instruction="close the drawer"), "instruction"),
    (lambda o: o.update(instruction=["a"]), "instruction"),
    (lambda o: o.update(image_mask=np.ones((2, 3), bool)), "image_mask"),
])
def test_adapter_rejects_malformed_observations(mutate, match):
  adapter = _adapter()
  obs = _obs()
  mutate(obs)
  with pytest.raises(ValueError, match=match):
    adapter(obs)


def test_adapter_rejects_unknown_dataset_and_camera():
  tok = tokenizers.make_tokenizer("bytes_mod:128")
  with pytest.raises(ValueError, match="dataset='other'"):
    pa.SimPolicyAdapter(_EchoPolicy(), {}, {}, STATISTICS, tok, 8, (32, 32), ("primary",), 6,
                        dataset="other")
  with pytest.raises(ValueError, match="secondary"):
    pa.SimPolicyAdapter(_EchoPolicy(), {}, {}, STATISTICS, tok, 8, (32, 32), ("secondary",), 6)
  with pytest.raises(ValueError, match="must be a dict"):
    _adapter()([1, 2])


def _sim_config(data_dir):
  spec = importlib.util.spec_from_file_location("_sim_config", os.path.join(ROOT, "configs/sim.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  from m2vla_jax.sim.metaworld import workflow  # pylint: disable=g-import-not-at-top
  c = module.get_config(f"steps=3,batch=8,episodes=2,eval_episodes=1,horizon=4,execute=2,width=32,"
                        f"data_dir={data_dir}")
  c.sim.tasks = ("drawer-close-v3", "button-press-topdown-v3")
  c.sim.dataset_name = workflow.name_from_config(c.sim)
  c.data.pipeline.datasets = c.sim.dataset_name
  c.sim.eval.variants = ("seen",)
  c.sim.eval.max_episode_steps = 6
  c.sim.eval.batch_size = 2
  c.sim.eval.num_videos = 1
  c.sim.eval.every = 3                    # one closed-loop evaluation during training, at the end
  c.sim.eval.during_training_episodes = 1
  c.model.memory.size = 64
  return c


@pytest.mark.slow
def test_demos_train_evaluate_writes_report(tmp_path, monkeypatch):
  from m2vla_jax.sim.metaworld import workflow  # pylint: disable=g-import-not-at-top
  config = _sim_config(str(tmp_path / "demos"))
  path = workflow.prepare_data(config)
  assert os.path.exists(os.path.join(path, "dataset_info.json"))
  assert workflow.prepare_data(config) == path                # cached: no second generation
  workdir = str(tmp_path / "run")
  # The whole workflow, as `python -m m2vla_jax.train --config=configs/sim.py` runs it.
  summary = workflow.run(config, workdir)
  assert summary["train_steps"] == 3 and np.isfinite(summary["final_loss"])
  assert set(summary["wall_s"]) >= {"prepare_data", "train", "evaluate", "total"}
  out = os.path.join(workdir, "sim_eval")
  for name in ("mt10_seen.json", "mt10_seen.png", "summary.json", "summary.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  assert os.listdir(os.path.join(out, "mt10_seen_videos"))
  with open(os.path.join(out, "mt10_seen.json")) as f:
    records = json.load(f)["episode_records"]
  assert [r["task"] for r in records] == list(config.sim.tasks)
  # Every episode ran the trained policy to its end: no policy or environment errors.
  assert all(r["reason"] in ("success", "timeout") for r in records), records
  assert all(1 <= r["steps"] <= 6 for r in records)
  assert summary["variants"]["seen"]["episodes"] == 2
  # Every call after the compiling one timed, at the evaluation's batch size.
  latency = summary["policy_latency"]
  assert latency["batch_size"] == workflow.eval_config(config.sim).batch_size
  assert latency["calls"] >= 1 and 0 < latency["median_ms"] <= latency["p90_ms"]
  # The evaluator ran the trained policy at step 3, on the training tasks, one episode each.
  [during] = summary["during_training"]
  assert during["step"] == 3 and during["closed_loop/seconds"] > 0
  assert 0.0 <= during["closed_loop/ci95_lo"] <= during["closed_loop/seen_success"] <= during[
      "closed_loop/ci95_hi"] <= 1.0

  # Meta-World through the policy server equals the in-process call on the same checkpoint and seeds:
  # the same chunks, bit for bit (one program, one CPU), hence the same episodes.
  from m2vla_jax import inference  # pylint: disable=g-import-not-at-top
  from m2vla_jax.inference import observation as obs_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.serving import client as client_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld  # pylint: disable=g-import-not-at-top
  loaded = inference.InferencePolicy.from_workdir(workdir)
  encoder = obs_lib.ObservationEncoder.from_config(loaded.config, loaded.normalization())
  chunks = {"local": [], "server": []}

  def logged(name, policy):
    return lambda obs: chunks[name].append(np.asarray(policy(obs), np.float32)) or chunks[name][-1]

  local = lambda obs: loaded(encoder({k: obs[k] for k in client_lib.RemotePolicy.KEYS}))  # noqa: E731
  eval_cfg = workflow.eval_config(config.sim)
  server = support.ServeProcess(f"--workdir={workdir}", f"--max_batch={eval_cfg.batch_size}")
  try:
    remote = client_lib.RemotePolicy(server.uri)
    via_server, _ = evaluate_metaworld.run_episodes(logged("server", remote), config.sim.tasks, eval_cfg)
    remote.close()
  finally:
    server.stop()
  in_process, _ = evaluate_metaworld.run_episodes(logged("local", local), config.sim.tasks, eval_cfg)
  assert via_server == in_process
  assert len(chunks["server"]) == len(chunks["local"]) > 0
  for a, b in zip(chunks["server"], chunks["local"]):
    np.testing.assert_array_equal(a, b)

  # Offline evaluation of the run in a process that never prepared its demonstrations (their data
  # registry entry removed): it registers them itself (`sim.workflows.prepare_data`) and scores them.
  from m2vla_jax import evaluate as offline_evaluate  # pylint: disable=g-import-not-at-top
  from m2vla_jax.data.oxe import registry  # pylint: disable=g-import-not-at-top
  monkeypatch.delitem(registry.DATASETS, config.sim.dataset_name)
  metrics = offline_evaluate.evaluate(loaded, max_batches=1)
  assert metrics["num_batches"] == 1 and list(metrics["datasets"]) == [config.sim.dataset_name]
  assert config.sim.dataset_name in registry.DATASETS


def test_config_mismatch_is_named(tmp_path):
  from m2vla_jax.sim.metaworld import workflow  # pylint: disable=g-import-not-at-top
  config = _sim_config(str(tmp_path))
  config.sim.episodes_per_task = 7                            # dataset_name no longer matches
  with pytest.raises(ValueError, match="config.sim.dataset_name"):
    workflow.prepare_data(config)


def test_demo_cache_name_is_one_scheme_for_the_config_and_the_cli(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import demos  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import env as metaworld_env  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import workflow  # pylint: disable=g-import-not-at-top
  config = _sim_config(str(tmp_path))
  name = config.sim.dataset_name
  assert name.startswith("metaworld_mt10_corner_nowrist_32px_n2_t2_")
  # `python -m m2vla_jax.sim.metaworld.demos` without --name names the same settings the same way
  cli = demos.DemoConfig(env=metaworld_env.EnvConfig(image_size=32, primary_camera="corner",
                                                     wrist_camera=None), post_success_steps=3)
  tasks = tuple(config.sim.tasks)
  assert demos.cache_name(demos.generation_spec("mt10", tasks, 2, cli)) == name
  # every setting of the recording changes the name; statistics-only ones do not
  for field, value in [("episodes_per_task", 3), ("post_success_steps", 0), ("image_size", 16),
                       ("wrist_camera", "gripperPOV"), ("tasks", tasks[:1])]:
    assert workflow.name_from_config({**config.sim.to_dict(), field: value}) != name, field
  assert demos.cache_name(demos.generation_spec(
      "mt10", tasks, 2, dataclasses.replace(cli, max_attempts_per_episode=5))) != name
  assert demos.cache_name(demos.generation_spec(
      "mt10", tasks, 2, dataclasses.replace(cli, measure_last_step=True))) == name
