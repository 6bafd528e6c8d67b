"""The closed loop every simulator shares: a chunked policy driving a batch of environments.

Owns: filling B environment slots from a queue of episodes, calling the policy once per re-plan on
a batch of B observations, executing each predicted chunk open loop for `execute_steps` steps
(receding horizon), ending an episode at its first success (the benchmarks' convention: Meta-World's
`info['success']`, LIBERO's `check_success()`), at the simulator's step limit, or at a failure,
and recording each episode and the frames of the ones asked for. Scoring the records is
`evaluation/summary.py`'s.

A simulator plugs in through a `Simulator` (how to open an environment for a task, reset it for an
episode and step it); an `Episode` says which task, which instruction and what the reset receives
(a seed for Meta-World, a benchmark init-state index for LIBERO).

The policy contract:
```
policy(obs) -> float [B, H, A]     H >= execute_steps, A = Simulator.action_dim
obs = {<every array the simulator's observation has, stacked: 'images', 'image_mask', 'state', ...>,
       'instruction': list[str] of B, 'task': list[str] of B}
```
B is always `batch_size` (rows of idle slots repeat an active row and their outputs are ignored)
so a jitted policy compiles once.

Failure handling: a policy that raises or returns a wrong shape fails the episodes of that call; a
non-finite action fails its episode; an environment that raises fails its episode and is rebuilt
for the next one. The reason is logged and stored with the episode, and evaluation continues.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from m2vla_jax.evaluation import summary as summary_lib

log = logging.getLogger(__name__)

Policy = Callable[[dict[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Episode:
  """One episode to run: `reset_arg` goes to `Simulator.reset`; `record` is stored with the result.
  `instruction` None: the environment's own (`env.instruction`, e.g. LIBERO's task language)."""
  task: str
  index: int
  instruction: str | None
  reset_arg: Any
  record: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def require_positive(config: Any, *fields: str) -> None:
  """ValueError naming `<Class>.<field>` when one of a config's counts (episodes, batch size,
  executed steps) is below 1."""
  for field in fields:
    if getattr(config, field) < 1:
      raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)} must be >= 1")


class Simulator(Protocol):
  """What the loop needs from a simulator. Environments have `steps` (control steps this episode)
  and `close()`; `step_async` may already run the step (a simulator without worker processes)."""
  action_dim: int

  def open(self, task: str, env: Any | None) -> Any:
    """An environment for `task`: `env` (None, or one whose previous task may differ) reused when it can."""

  def reset(self, env: Any, episode: Episode) -> dict[str, np.ndarray]:
    """Starts `episode`; the first observation, rendered."""

  def step_async(self, env: Any, action: np.ndarray, render: bool) -> None:
    """Sends one action; `render=False` allows skipping the cameras (nobody reads that frame)."""

  def step_wait(self, env: Any) -> tuple[dict[str, np.ndarray], bool, bool]:
    """(observation, success, truncated) of the step sent."""

  def frame(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The image a video of the episode shows, uint8 [H, W, 3]."""


class StepEnvSimulator:
  """A `Simulator` over environments stepped as `step(action, **kw)` in process or
  `step_async(action, **kw)` / `step_wait()` in a worker, both returning (observation, reward,
  success, truncated, info), whose first camera makes the video. Subclasses give `action_dim`,
  `open`, `reset` and, when their environments take step options, `step_options(render)`."""

  def __init__(self):
    self._done: dict[int, Any] = {}    # results of in-process steps, until step_wait

  def step_options(self, render: bool) -> dict[str, Any]:
    del render
    return {}

  def step_async(self, env: Any, action: np.ndarray, render: bool) -> None:
    if hasattr(env, "step_async"):
      env.step_async(action, **self.step_options(render))
    else:
      self._done[id(env)] = env.step(action, **self.step_options(render))

  def step_wait(self, env: Any) -> tuple[dict[str, np.ndarray], bool, bool]:
    result = self._done.pop(id(env), None)
    obs, _, success, truncated, _ = env.step_wait() if result is None else result
    return obs, success, truncated

  def frame(self, obs: Mapping[str, np.ndarray]) -> np.ndarray:
    return obs["images"][0]


@dataclasses.dataclass
class _Slot:
  env: Any = None
  episode: Episode | None = None
  instruction: str = ""
  obs: dict[str, np.ndarray] | None = None
  frames: list[np.ndarray] | None = None


def _stack(slots: Sequence[_Slot], fill: _Slot) -> dict[str, Any]:
  rows = [s if s.episode is not None else fill for s in slots]
  batch: dict[str, Any] = {k: np.stack([s.obs[k] for s in rows]) for k in rows[0].obs}
  batch["instruction"] = [s.instruction for s in rows]
  batch["task"] = [s.episode.task for s in rows]
  return batch


def run_episodes(policy: Policy, episodes: Sequence[Episode], simulator: Simulator, *,
                 batch_size: int, execute_steps: int, record_video: Callable[[Episode], bool] = (
                     lambda episode: False),
                 ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list[np.ndarray]]]:
  """Runs `episodes` with the policy in the loop, `batch_size` environments at a time.

  Returns:
    (records, videos): one record per episode, in the order given, with keys task, index,
    instruction, success, steps, reason ('success', 'timeout' or the failure) and the episode's
    `record` fields; and {(task, index): list of uint8 [H, W, 3] frames} of the episodes
    `record_video` picked.
  """
  if batch_size < 1 or execute_steps < 1:
    raise ValueError(f"batch_size={batch_size} and execute_steps={execute_steps} must be >= 1")
  queue = collections.deque(episodes)
  slots = [_Slot() for _ in range(batch_size)]
  records: dict[tuple[str, int], dict[str, Any]] = {}
  videos: dict[tuple[str, int], list[np.ndarray]] = {}

  def finish(slot: _Slot, success: bool, reason: str, steps: int) -> None:
    ep = slot.episode
    if slot.obs is None:                  # failed before the environment said its instruction
      slot.instruction = ep.instruction or ""
    if reason not in ("success", "timeout"):
      log.warning("episode %s #%d (%s) failed: %s", ep.task, ep.index, dict(ep.record), reason)
    records[(ep.task, ep.index)] = dict(task=ep.task, index=ep.index, **ep.record,
                                        instruction=slot.instruction, success=success, steps=steps,
                                        reason=reason)
    if slot.frames is not None:
      videos[(ep.task, ep.index)] = slot.frames
    slot.episode, slot.obs, slot.frames = None, None, None

  def start(slot: _Slot) -> None:
    while queue and slot.episode is None:
      slot.episode = queue.popleft()
      try:
        slot.env = simulator.open(slot.episode.task, slot.env)
        slot.obs = simulator.reset(slot.env, slot.episode)
        slot.instruction = (slot.episode.instruction if slot.episode.instruction is not None
                            else slot.env.instruction)
      except Exception as e:  # pylint: disable=broad-except
        if slot.env is not None:
          _close_quietly(slot.env)
        slot.env = None  # may be half-initialised; a fresh one is built for the next episode
        finish(slot, False, f"env_error at reset: {type(e).__name__}: {e}", 0)
        continue
      slot.frames = [simulator.frame(slot.obs)] if record_video(slot.episode) else None

  try:
    while True:
      for slot in slots:
        if slot.episode is None:
          start(slot)
      active = [s for s in slots if s.episode is not None]
      if not active:
        break
      batch = _stack(slots, active[0])
      try:
        chunk = np.asarray(policy(batch), np.float64)
        if chunk.ndim != 3 or chunk.shape[0] != len(slots) or chunk.shape[2] != simulator.action_dim:
          raise ValueError(f"policy returned shape {chunk.shape}; expected [B={len(slots)}, H, "
                           f"{simulator.action_dim}]")
        if chunk.shape[1] < execute_steps:
          raise ValueError(f"policy returned chunks of H={chunk.shape[1]} actions but "
                           f"execute_steps={execute_steps}; lower execute_steps")
      except Exception as e:  # pylint: disable=broad-except
        for slot in active:
          finish(slot, False, f"policy_error: {type(e).__name__}: {e}", slot.env.steps)
        continue
      for k in range(execute_steps):
        replan_next = k == execute_steps - 1
        # Send every action first, then collect: process-isolated environments step in parallel.
        sent: dict[int, Exception | None] = {}
        for i, slot in enumerate(slots):
          if slot.episode is None:
            continue
          action = chunk[i, k]
          if not np.all(np.isfinite(action)):
            finish(slot, False, f"nonfinite_action at step {slot.env.steps}: {action.tolist()}",
                   slot.env.steps)
            continue
          try:
            simulator.step_async(slot.env, action, replan_next or slot.frames is not None)
            sent[i] = None
          except Exception as e:  # pylint: disable=broad-except
            sent[i] = e
        for i, error in sent.items():
          slot = slots[i]
          try:
            if error is not None:
              raise error
            obs, success, truncated = simulator.step_wait(slot.env)
          except Exception as e:  # pylint: disable=broad-except
            steps = slot.env.steps
            _close_quietly(slot.env)
            slot.env = None  # state unknown after a crash: rebuild for the next episode
            finish(slot, False, f"env_error: {type(e).__name__}: {e}", steps)
            continue
          slot.obs = obs
          if slot.frames is not None:
            slot.frames.append(simulator.frame(obs))
          if success:
            finish(slot, True, "success", slot.env.steps)
          elif truncated:
            finish(slot, False, "timeout", slot.env.steps)
  finally:
    for slot in slots:
      if slot.env is not None:
        _close_quietly(slot.env)
  return [records[(ep.task, ep.index)] for ep in episodes], videos


class RandomChunkPolicy:
  """Uniform random actions in [-1, 1] for any simulator (a floor for success rates)."""

  def __init__(self, action_dim: int, horizon: int, seed: int = 0):
    self.action_dim, self.horizon = int(action_dim), int(horizon)
    self._rng = np.random.default_rng(seed)

  def __call__(self, obs: Mapping[str, Any]) -> np.ndarray:
    return self._rng.uniform(-1.0, 1.0, (len(obs["instruction"]), self.horizon, self.action_dim))


def report(records: Sequence[Mapping[str, Any]], videos: Mapping[tuple[str, int], Sequence[np.ndarray]],
           name: str, out_dir: str | None, video_fps: int, **context: Any) -> dict[str, Any]:
  """The evaluation result of `run_episodes`' output (`summary.summarize` plus `context`, the records
  under 'episode_records'); with `out_dir`, `<name>.json/.png` and `<name>_videos/*.gif` written."""
  result = summary_lib.summarize(records)
  result.update(name=name, **context, episode_records=list(records))
  if out_dir:
    summary_lib.write_evaluation(result, out_dir, name)
    if videos:
      video_dir = os.path.join(out_dir, f"{name}_videos")
      os.makedirs(video_dir, exist_ok=True)
      result["videos"] = save_videos(videos, video_dir, video_fps)
  log.info("%s", summary_lib.headline(name, result))
  return result


def _close_quietly(env: Any) -> None:
  try:
    env.close()
  except Exception as e:  # pylint: disable=broad-except
    log.warning("closing an environment failed: %s: %s", type(e).__name__, e)


def save_videos(videos: Mapping[tuple[str, int], Sequence[np.ndarray]], out_dir: str,
                fps: int) -> list[str]:
  """Writes each rollout as `<task>_<index>.gif` (a '/' in a task name becomes '_'); returns the paths."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  paths = []
  for (task, index), frames in videos.items():
    path = os.path.join(out_dir, f"{task.replace('/', '_')}_{index}.gif")
    imageio.mimsave(path, [np.asarray(f) for f in frames], duration=1.0 / fps, loop=0)
    paths.append(path)
  return paths
