"""The closed loop every simulator shares, on a scripted fake simulator (no physics, no rendering).

A fake environment walks a 1-d position by the action's first entry and succeeds on reaching its
target; what each episode must record (steps, success, reason) follows from the actions by hand.
"""
import numpy as np
import pytest

from m2vla_jax.evaluation import closed_loop


class _Env:
  def __init__(self, task, limit=6, action_dim=2):
    self.task, self.limit, self.action_dim = task, limit, action_dim
    self.steps, self.closed, self.instruction = 0, False, f"reach {task}"
    self.position = self.target = 0.0
    self.pending = None

  def observation(self):
    image = np.full((4, 4, 3), min(self.steps, 255), np.uint8)
    return {"images": image[None], "image_mask": np.ones((1,), bool),
            "state": np.array([self.position], np.float32)}

  def reset(self, target):
    if target == "explode":
      raise RuntimeError("reset failed")
    self.position, self.target, self.steps = 0.0, float(target), 0
    return self.observation()

  def step(self, action):
    if action[1] > 5:
      raise RuntimeError("the simulation went unstable")
    self.position += float(action[0])
    self.steps += 1
    return self.observation(), self.position >= self.target, self.steps >= self.limit

  def close(self):
    self.closed = True


class _FakeSimulator:
  action_dim = 2

  def __init__(self):
    self.opened, self.done = [], {}

  def open(self, task, env):
    if env is not None and env.task == task:
      return env
    if env is not None:
      env.close()
    env = _Env(task)
    self.opened.append(env)
    return env

  def reset(self, env, episode):
    return env.reset(episode.reset_arg)

  def step_async(self, env, action, render):
    self.done[id(env)] = env.step(action)

  def step_wait(self, env):
    return self.done.pop(id(env))

  def frame(self, obs):
    return obs["images"][0]


def _policy(log):
  """Moves +1 per step; a row whose state is 2 asks for a non-finite action, one at 3 for an unstable one."""
  def policy(obs):
    log.append(obs)
    b = len(obs["instruction"])
    chunk = np.ones((b, 3, 2))
    chunk[:, :, 1] = 0.0
    position = obs["state"][:, 0]
    chunk[position == 2, 1, 0] = np.nan      # the second action of this chunk
    chunk[position == 3, 0, 1] = 10.0
    return chunk
  return policy


def test_episodes_end_at_success_timeout_or_failure_with_the_reason():
  E = closed_loop.Episode
  episodes = [E("a", 0, "go", reset_arg=2, record={"seed": 11}),   # reached at step 2
              E("a", 1, None, reset_arg=100),                      # times out at 6 ... unless
              E("b", 0, "go", reset_arg="explode"),                # the reset raises
              E("b", 1, "go", reset_arg=1)]                        # reached at step 1
  log = []
  sim = _FakeSimulator()
  records, videos = closed_loop.run_episodes(_policy(log), episodes, sim, batch_size=3,
                                             execute_steps=2,
                                             record_video=lambda ep: ep.index == 0)
  by = {(r["task"], r["index"]): r for r in records}
  assert [(r["task"], r["index"]) for r in records] == [(e.task, e.index) for e in episodes]
  assert by[("a", 0)] == dict(task="a", index=0, seed=11, instruction="go", success=True, steps=2,
                              reason="success")
  # Re-planned at position 2 (after 2 steps): the chunk's second action is NaN.
  assert not by[("a", 1)]["success"] and by[("a", 1)]["steps"] == 3
  assert by[("a", 1)]["reason"].startswith("nonfinite_action at step 3")
  assert by[("a", 1)]["instruction"] == "reach a"            # None: the environment's own
  assert by[("b", 0)]["reason"].startswith("env_error at reset: RuntimeError: reset failed")
  assert by[("b", 1)]["success"] and by[("b", 1)]["steps"] == 1
  # Every call had the full batch; idle rows repeat an active one.
  assert all(len(o["instruction"]) == 3 and o["images"].shape == (3, 1, 4, 4, 3) for o in log)
  assert all(set(o) == {"images", "image_mask", "state", "instruction", "task"} for o in log)
  # Videos: the first frame and one per executed step.
  assert sorted(videos) == [("a", 0)]        # ("b", 0) never started
  assert len(videos[("a", 0)]) == 3
  assert all(env.closed for env in sim.opened)


def test_an_unstable_environment_fails_its_episode_and_is_rebuilt():
  E = closed_loop.Episode
  # Row 0 reaches position 3 after 3 steps, then its next action is unstable.
  episodes = [E("a", 0, "go", reset_arg=100), E("a", 1, "go", reset_arg=1)]
  sim = _FakeSimulator()
  records, _ = closed_loop.run_episodes(_policy([]), episodes, sim, batch_size=1, execute_steps=3)
  assert records[0]["reason"] == "env_error: RuntimeError: the simulation went unstable"
  assert records[0]["steps"] == 3 and records[1]["success"]
  assert len(sim.opened) == 2 and sim.opened[0].closed   # the crashed one was not reused


def test_a_policy_error_fails_the_episodes_of_that_call():
  def bad(obs):
    return np.zeros((len(obs["instruction"]), 3, 5))        # wrong action size
  records, _ = closed_loop.run_episodes(bad, [closed_loop.Episode("a", i, "go", 1) for i in range(2)],
                                        _FakeSimulator(), batch_size=2, execute_steps=2)
  assert all(r["reason"].startswith("policy_error: ValueError: policy returned shape (2, 3, 5)")
             for r in records)
  with pytest.raises(ValueError, match="batch_size=0"):
    closed_loop.run_episodes(bad, [], _FakeSimulator(), batch_size=0, execute_steps=2)
