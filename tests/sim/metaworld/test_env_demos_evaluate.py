"""Meta-World simulation: environments, expert demonstrations and closed-loop evaluation."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.sim.metaworld import demos  # noqa: E402
from m2vla_jax.sim.metaworld import evaluate as ev  # noqa: E402
from m2vla_jax.sim.metaworld import instructions  # noqa: E402
from m2vla_jax.sim.metaworld import env as me  # noqa: E402
from m2vla_jax.sim.common import demo_cache  # noqa: E402
from m2vla_jax.evaluation import summary as summary_lib  # noqa: E402

SMALL = me.EnvConfig(image_size=32)


def _replay_success_steps(task, seed, actions):
  """Success flag after each of `actions`, replayed without rendering from `seed`."""
  flags = []
  with me.make_env(task, SMALL) as env:
    env.reset(seed, render=False)
    for a in actions:
      flags.append(env.step(a, render=False)[2])
  return flags


def test_instructions_cover_mt50_and_split_disjointly():
  for task in me.suite_tasks("mt50"):
    train, held = instructions.train_instructions(task), instructions.held_out_instructions(task)
    assert len(train) >= 2 and len(held) >= 2
    assert not set(train) & set(held)
  with pytest.raises(ValueError, match="reach-v3"):
    instructions.all_instructions("reach")


def test_seeds_determine_initial_state_and_splits_are_disjoint():
  with me.make_env("push-v3", SMALL) as env:
    s0 = me.episode_seed("push-v3", 0, "train")
    env.reset(s0, render=False)
    first = env.last_rand_vec.copy()
    env.reset(me.episode_seed("push-v3", 1, "train"), render=False)
    other = env.last_rand_vec.copy()
    env.reset(s0, render=False)
    np.testing.assert_array_equal(env.last_rand_vec, first)
    assert not np.allclose(first, other)
  train = {me.episode_seed(t, i, "train") for t in me.suite_tasks("mt50") for i in range(100)}
  evals = {me.episode_seed(t, i, "eval") for t in me.suite_tasks("mt50") for i in range(100)}
  assert len(train) == len(evals) == 5000 and not train & evals


@pytest.mark.slow
def test_demos_cut_at_first_success_flipped_and_written(tmp_path):
  cfg = demos.DemoConfig(env=SMALL, post_success_steps=0)
  episodes, stats = demos.generate_demos(["reach-v3", "button-press-topdown-v3"], 1, cfg)
  assert [s.task for s in stats] == ["reach-v3", "button-press-topdown-v3"]
  for s in stats:
    assert s.discarded == s.attempts - s.succeeded_any
    assert s.success_rate == s.succeeded_any / s.attempts
  assert len(episodes) == sum(s.succeeded_any for s in stats) == 2
  for ep in episodes:
    meta, obs, t = ep["episode_metadata"], ep["observation"], len(ep["action"])
    np.testing.assert_array_equal(ep["is_first"], np.arange(t) == 0)
    np.testing.assert_array_equal(ep["is_last"], np.arange(t) == t - 1)
    np.testing.assert_array_equal(ep["is_terminal"], ep["is_last"])
    assert obs["image"].shape == obs["wrist_image"].shape == (t, 32, 32, 3)
    assert obs["image"].dtype == obs["wrist_image"].dtype == np.uint8
    assert obs["state"].shape == (t, 4) and ep["reward"].shape == (t,)
    assert ep["action"].shape == (t, 4) and np.all(np.abs(ep["action"]) <= 1.0)
    assert ep["language_instruction"] in instructions.train_instructions(meta["task"])
    # Independent check of the cut: replaying the recorded actions succeeds first at the last one.
    flags = _replay_success_steps(meta["task"], meta["seed"], ep["action"])
    assert flags[-1] and not any(flags[:-1])
    assert meta["first_success_step"] == t - 1

  # Primary camera against a raw MuJoCo render of the same initial state: rotated by 180 degrees.
  ep = episodes[0]
  with me.make_env(ep["episode_metadata"]["task"], SMALL) as env:
    env.reset(ep["episode_metadata"]["seed"], render=False)
    raw_image = env.call("reference_render", "corner")  # a fresh MuJoCo renderer, no flip
  recorded = ep["observation"]["image"][0]
  np.testing.assert_array_equal(recorded, raw_image[::-1, ::-1])
  assert not np.array_equal(recorded, raw_image)

  # Written with the data writer and read back through the registry entry (png: lossless).
  from m2vla_jax.data import rlds
  path = demos.write_demos(episodes, str(tmp_path), "mw_demo_test", stats, image_encoding="png")
  assert demo_cache.dataset_dir(str(tmp_path), "mw_demo_test") == path
  assert "| reach-v3 |" in open(os.path.join(path, "DEMOS.md")).read()
  loaded = rlds.load_dataset(str(tmp_path), demos.dataset_spec("mw_demo_test"), "train",
                             progress=False)
  assert len(loaded.episodes) == len(episodes)
  for got, want in zip(loaded.episodes, episodes):
    np.testing.assert_array_equal(got["action"], want["action"])
    np.testing.assert_array_equal(got["state"], want["observation"]["state"])
    assert got["instruction"][0] == want["language_instruction"]
    assert set(got["images"]) == {"primary", "wrist"}


def test_failed_demos_are_discarded_and_counted():
  cfg = demos.DemoConfig(env=me.EnvConfig(image_size=16, wrist_camera=None,
                                          max_episode_steps=5), max_attempts_per_episode=2)
  episodes, stats = demos.generate_task_demos("drawer-close-v3", 1, cfg)
  assert episodes == []
  assert (stats.attempts, stats.succeeded_any, stats.discarded) == (2, 0, 2)
  assert "| drawer-close-v3 | 2 | 0% |" in demos.stats_markdown([stats])


def test_post_success_steps_kept_only_while_success_holds():
  cfg = demos.DemoConfig(env=me.EnvConfig(image_size=16, wrist_camera=None), post_success_steps=3)
  episodes, _ = demos.generate_task_demos("reach-v3", 1, cfg)
  actions, meta = episodes[0]["action"], episodes[0]["episode_metadata"]
  first = meta["first_success_step"]
  assert first < len(actions) <= first + 4
  flags = _replay_success_steps("reach-v3", meta["seed"], actions)
  assert all(flags[first:]) and not any(flags[:first])


@pytest.mark.slow
def test_expert_as_chunked_policy_succeeds(tmp_path):
  cfg = ev.EvalConfig(env=me.EnvConfig(image_size=32, wrist_camera=None), episodes_per_task=2,
                      batch_size=4, execute_steps=1, num_videos=1)
  result = ev.evaluate(ev.ExpertChunkPolicy(horizon=2), ["reach-v3", "drawer-close-v3"], cfg,
                       out_dir=str(tmp_path), name="expert")
  successes = sum(e["successes"] for e in result["per_task"].values())
  assert successes >= 3, result["per_task"]
  assert result["episodes"] == 4
  for ep in result["episode_records"]:
    assert ep["seed"] == me.episode_seed(ep["task"], ep["index"], "eval")
    assert ep["instruction"] in instructions.train_instructions(ep["task"])
    if ep["success"]:
      assert ep["steps"] < me.max_path_length(ep["task"])  # ended at the first success
  assert os.path.exists(tmp_path / "expert.json") and os.path.exists(tmp_path / "expert.png")
  assert os.path.exists(tmp_path / "expert_videos" / "reach-v3_0.gif")


@pytest.mark.slow
def test_random_policy_fails():
  cfg = ev.EvalConfig(env=me.EnvConfig(image_size=16, wrist_camera=None), episodes_per_task=1,
                      batch_size=2, execute_steps=8, num_videos=0, instruction_variant="paraphrased")
  result = ev.evaluate(ev.RandomChunkPolicy(horizon=8), ["pick-place-v3", "peg-insert-side-v3"],
                       cfg)
  assert sum(e["successes"] for e in result["per_task"].values()) == 0
  for ep in result["episode_records"]:
    assert ep["reason"] == "timeout" and ep["steps"] == 500
    assert ep["instruction"] in instructions.held_out_instructions(ep["task"])


# Fake environments keep real task names (instructions are looked up by name); their behaviour:
OK, OK2, NAN_POLICY, CRASHES, BROKEN = ("reach-v3", "push-v3", "door-open-v3", "drawer-open-v3",
                                        "window-open-v3")


class _FakeEnv:
  """A deterministic stand-in: succeeds once the summed x-actions reach 1, records actions."""
  log: list = []

  def __init__(self, task, config):
    self.task, self.config, self.steps = task, config, 0
    if task == BROKEN:
      raise RuntimeError("cannot build")

  def _obs(self):
    return {"images": np.zeros((1, 4, 4, 3), np.uint8), "image_mask": np.ones((1,), bool),
            "state": np.full((4,), self.total, np.float32), "privileged": np.zeros((39,))}

  def reset(self, seed, render=True):
    self.steps, self.total = 0, 0.0
    return self._obs()

  def step(self, action, render=True):
    if self.task == CRASHES and self.steps == 2:
      raise me.SimulationError("NaN state")
    self.steps += 1
    self.total += float(action[0])
    _FakeEnv.log.append((self.task, self.steps, np.array(action)))
    return self._obs(), 0.0, self.total >= 1.0 - 1e-9, self.steps >= 20, {}

  def close(self):
    pass


def test_failures_are_isolated_and_logged(caplog):
  def policy(obs):
    out = np.full((len(obs["task"]), 3, 4), 0.25)
    for i, task in enumerate(obs["task"]):
      if task == NAN_POLICY:
        out[i] = np.nan
    return out

  cfg = ev.EvalConfig(env=SMALL, episodes_per_task=2, batch_size=3, execute_steps=3, num_videos=0)
  tasks = [OK, NAN_POLICY, CRASHES, BROKEN, OK2]
  with caplog.at_level("WARNING"):
    episodes, _ = ev.run_episodes(policy, tasks, cfg, env_factory=_FakeEnv)
  reasons = {(e["task"], e["index"]): e["reason"] for e in episodes}
  assert len(episodes) == 10
  for i in range(2):
    assert reasons[(OK, i)] == reasons[(OK2, i)] == "success"
    assert reasons[(NAN_POLICY, i)].startswith("nonfinite_action")
    assert reasons[(CRASHES, i)].startswith("env_error: SimulationError")
    assert reasons[(BROKEN, i)].startswith("env_error at reset: RuntimeError")
  # 4 actions of 0.25 reach the goal: success is scored at the 4th step, mid-chunk.
  assert all(e["steps"] == 4 for e in episodes if e["success"])
  assert "nonfinite_action" in caplog.text and "SimulationError" in caplog.text
  summary = summary_lib.summarize(episodes)
  assert summary["per_task"][OK]["success_rate"] == 1.0
  assert summary["per_task"][CRASHES]["failures"] == {"env_error": 2}
  assert summary["mean_success"] == pytest.approx(0.4)


def test_policy_exception_fails_batch_and_continues():
  calls = []

  def policy(obs):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("device OOM")
    return np.ones((len(obs["task"]), 1, 4))

  cfg = ev.EvalConfig(env=SMALL, episodes_per_task=2, batch_size=2, execute_steps=1, num_videos=0)
  episodes, _ = ev.run_episodes(policy, [OK], cfg, env_factory=_FakeEnv)
  assert [e["reason"].split(":")[0] for e in episodes] == ["policy_error", "policy_error"]
  episodes, _ = ev.run_episodes(policy, [OK, OK2], cfg, env_factory=_FakeEnv)
  assert all(e["success"] and e["steps"] == 1 for e in episodes)


def test_receding_horizon_executes_chunk_prefix():
  _FakeEnv.log = []
  calls = []

  def policy(obs):
    calls.append(obs["state"][:, 0].copy())
    b = len(obs["task"])
    chunk = np.zeros((b, 5, 4))
    chunk[:, :, 0] = 0.01 * (np.arange(5) + 1) + 0.1 * (len(calls) - 1)   # tags (call, k)
    return chunk

  cfg = ev.EvalConfig(env=SMALL, episodes_per_task=1, batch_size=1, execute_steps=2, num_videos=0)
  ev.run_episodes(policy, [OK], cfg, env_factory=_FakeEnv)
  executed = [a[0] for (_, _, a) in _FakeEnv.log]
  expected = []
  for call in range(len(calls)):
    expected += [0.1 * call + 0.01, 0.1 * call + 0.02]
  np.testing.assert_allclose(executed, expected[:len(executed)], atol=1e-12)
  assert len(executed) <= len(expected) and len(expected) - len(executed) < 2
  # The policy saw the state after each executed prefix (re-planning from the new observation).
  np.testing.assert_allclose([c[0] for c in calls[1:]],
                             np.cumsum(executed)[1::2][:len(calls) - 1], atol=1e-6)
  with pytest.raises(ValueError, match="execute_steps"):
    ev.EvalConfig(execute_steps=0)


def test_env_detects_nan_state():
  with me.make_env("reach-v3", me.EnvConfig(image_size=16, wrist_camera=None)) as env:
    env.reset(me.episode_seed("reach-v3", 0), render=False)
    env.step(np.zeros(4), render=False)
    env.call("inject_nan_state")
    with pytest.raises(me.SimulationError, match="instability|non-finite"):
      env.step(np.zeros(4), render=False)
    with pytest.raises(ValueError, match="non-finite"):
      env.step(np.array([0.0, np.nan, 0.0, 0.0]))
  with pytest.raises(ValueError, match="primary_camera"):
    me.EnvConfig(primary_camera="front")
