"""Closed-loop Meta-World evaluation of a chunked policy, scored the benchmark's way.

Owns: running N episodes per task from held-out seeds (`episode_seed(task, i, 'eval')`, disjoint
from the demonstration seeds) with the benchmark's step limit, batching the policy across B
environments, executing each predicted action chunk open-loop for `execute_steps` steps
(receding horizon), scoring success as Meta-World does (an episode succeeds at the first step
whose `info['success']` is True and ends there), and the report (JSON and bar plot with Wilson
intervals through `m2vla_jax.sim.common.summary`; rollout GIFs). Evaluation variants:
instructions seen in training, held-out paraphrases, held-out tasks, and the seen tasks under visual
shifts never seen in training ('shift_camera', 'shift_lighting', 'shift_colors', 'shift_all';
`sim/visual_shift.py`).

The policy contract (what the simulator hands a policy and what it expects back):
```
policy(obs) -> float [B, H, A]     H >= execute_steps, A = 4, Meta-World actions in [-1, 1]
obs = {
  'images':      uint8   [B, C, H_img, W_img, 3]   cameras (primary, wrist)
  'image_mask':  bool    [B, C]
  'state':       float32 [B, 4]    raw proprio (hand xyz, gripper opening); the policy normalizes
  'instruction': list[str] of B    natural-language instruction
  'task':        list[str] of B    task names: for scripted/oracle baselines only
  'privileged':  float64 [B, 39]   Meta-World's state vector: for scripted/oracle baselines only
}
```
B is always `EvalConfig.batch_size` (rows of idle environments repeat an active row and their
outputs are ignored) so a jitted policy compiles once.

Failure handling: a policy that raises or returns non-finite actions, and an environment that
raises (including `SimulationError` on NaN state or MuJoCo instability), fail only the episodes
concerned; the reason is logged and stored with the episode, and evaluation continues.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from m2vla_jax.sim import instructions
from m2vla_jax.sim import metaworld_env
from m2vla_jax.sim import visual_shift
from m2vla_jax.sim.common import summary as summary_lib

log = logging.getLogger(__name__)

Policy = Callable[[dict[str, Any]], Any]
VARIANTS = ("seen", "paraphrased", "held_out_tasks")
SHIFT_VARIANTS = tuple(f"shift_{k}" for k in visual_shift.KINDS)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Closed-loop evaluation settings.

  Attributes:
    env: cameras, image size and step limit (None = the benchmark's max_path_length).
    episodes_per_task: episodes per task, from held-out seeds.
    batch_size: environments stepped together; the policy is called with this batch size.
    execute_steps: actions of each predicted chunk executed before re-planning.
    instruction_variant: 'seen' (training paraphrases) or 'paraphrased' (held-out ones).
    num_videos: rollouts saved as GIFs (the first episode of the first tasks).
    video_fps: frames per second of the GIFs.
  """
  env: metaworld_env.EnvConfig = metaworld_env.EnvConfig()
  episodes_per_task: int = 50
  batch_size: int = 8
  execute_steps: int = 4
  instruction_variant: str = "seen"
  num_videos: int = 3
  video_fps: int = 20

  def __post_init__(self):
    for field in ("episodes_per_task", "batch_size", "execute_steps"):
      if getattr(self, field) < 1:
        raise ValueError(f"EvalConfig.{field}={getattr(self, field)} must be >= 1")
    if self.instruction_variant not in ("seen", "paraphrased"):
      raise ValueError(f"EvalConfig.instruction_variant={self.instruction_variant!r}; use 'seen' "
                       f"or 'paraphrased'")


@dataclasses.dataclass
class _Slot:
  env: Any = None
  job: tuple[str, int] | None = None
  seed: int = 0
  instruction: str = ""
  obs: dict[str, np.ndarray] | None = None
  frames: list[np.ndarray] | None = None


def _instruction(task: str, index: int, variant: str) -> str:
  pool = (instructions.held_out_instructions(task) if variant == "paraphrased"
          else instructions.train_instructions(task))
  return pool[index % len(pool)]


def _stack(slots: Sequence[_Slot], fill: _Slot) -> dict[str, Any]:
  rows = [s if s.job is not None else fill for s in slots]
  return {
      "images": np.stack([s.obs["images"] for s in rows]),
      "image_mask": np.stack([s.obs["image_mask"] for s in rows]),
      "state": np.stack([s.obs["state"] for s in rows]),
      "privileged": np.stack([s.obs["privileged"] for s in rows]),
      "instruction": [s.instruction for s in rows],
      "task": [s.job[0] for s in rows],
  }


def run_episodes(policy: Policy, tasks: Sequence[str], config: EvalConfig,
                 env_factory: Callable[[str, metaworld_env.EnvConfig], Any] = (
                     metaworld_env.make_env),
                 ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], list[np.ndarray]]]:
  """Runs `episodes_per_task` episodes of every task with the policy in the loop.

  Returns:
    (episodes, videos): one record per episode in (task, index) order with keys task, index,
    seed, instruction, success, steps, reason ('success', 'timeout' or the failure); and
    {(task, index): list of uint8 [H, W, 3] primary-camera frames} for the recorded episodes.
  """
  jobs = collections.deque((t, i) for t in tasks for i in range(config.episodes_per_task))
  video_jobs = {(t, 0) for t in list(tasks)[:config.num_videos]}
  slots = [_Slot() for _ in range(config.batch_size)]
  records: dict[tuple[str, int], dict[str, Any]] = {}
  videos: dict[tuple[str, int], list[np.ndarray]] = {}

  def finish(slot: _Slot, success: bool, reason: str, steps: int) -> None:
    task, index = slot.job
    if reason not in ("success", "timeout"):
      log.warning("episode %s #%d (seed %d) failed: %s", task, index, slot.seed, reason)
    records[slot.job] = dict(task=task, index=index, seed=slot.seed, instruction=slot.instruction,
                             success=success, steps=steps, reason=reason)
    if slot.frames is not None:
      videos[slot.job] = slot.frames
    slot.job, slot.obs, slot.frames = None, None, None

  def start(slot: _Slot) -> None:
    while jobs and slot.job is None:
      task, index = jobs.popleft()
      slot.job = (task, index)
      slot.seed = metaworld_env.episode_seed(task, index, "eval")
      slot.instruction = _instruction(task, index, config.instruction_variant)
      try:
        if slot.env is not None and slot.env.task != task:
          if hasattr(slot.env, "set_task"):  # a ProcessEnv keeps its worker process
            slot.env.set_task(task)
          else:
            slot.env.close()
            slot.env = None
        if slot.env is None:
          slot.env = env_factory(task, config.env)
        slot.obs = slot.env.reset(slot.seed, render=True)
      except Exception as e:  # pylint: disable=broad-except
        slot.env = None  # may be half-initialised; a fresh one is built for the next job
        finish(slot, False, f"env_error at reset: {type(e).__name__}: {e}", 0)
        continue
      slot.frames = [slot.obs["images"][0]] if slot.job in video_jobs else None

  try:
    while True:
      for slot in slots:
        if slot.job is None:
          start(slot)
      active = [s for s in slots if s.job is not None]
      if not active:
        break
      batch = _stack(slots, active[0])
      try:
        chunk = np.asarray(policy(batch), np.float64)
        if chunk.ndim != 3 or chunk.shape[0] != len(slots) or chunk.shape[2] != 4:
          raise ValueError(f"policy returned shape {chunk.shape}; expected [B={len(slots)}, H, 4]")
        if chunk.shape[1] < config.execute_steps:
          raise ValueError(f"policy returned chunks of H={chunk.shape[1]} actions but "
                           f"EvalConfig.execute_steps={config.execute_steps}; lower execute_steps")
      except Exception as e:  # pylint: disable=broad-except
        for slot in active:
          finish(slot, False, f"policy_error: {type(e).__name__}: {e}", slot.env.steps)
        continue
      for k in range(config.execute_steps):
        replan_next = k == config.execute_steps - 1
        # Send every action first, then collect: process-isolated envs step in parallel.
        results: dict[int, Any] = {}
        for i, slot in enumerate(slots):
          if slot.job is None:
            continue
          action = chunk[i, k]
          if not np.all(np.isfinite(action)):
            finish(slot, False, f"nonfinite_action at step {slot.env.steps}: {action.tolist()}",
                   slot.env.steps)
            continue
          render = replan_next or slot.frames is not None
          try:
            if hasattr(slot.env, "step_async"):
              slot.env.step_async(action, render=render)
              results[i] = None
            else:
              results[i] = slot.env.step(action, render=render)
          except Exception as e:  # pylint: disable=broad-except
            results[i] = e
        for i, result in results.items():
          slot = slots[i]
          try:
            if isinstance(result, Exception):
              raise result
            obs, _, success, truncated, _ = (slot.env.step_wait() if result is None else result)
          except Exception as e:  # pylint: disable=broad-except
            steps = slot.env.steps
            slot.env.close()
            slot.env = None  # state unknown after a crash: rebuild for the next episode
            finish(slot, False, f"env_error: {type(e).__name__}: {e}", steps)
            continue
          slot.obs = obs
          if slot.frames is not None:
            slot.frames.append(obs["images"][0])
          if success:
            finish(slot, True, "success", slot.env.steps)
          elif truncated:
            finish(slot, False, "timeout", slot.env.steps)
  finally:
    for slot in slots:
      if slot.env is not None:
        slot.env.close()
  episodes = [records[(t, i)] for t in tasks for i in range(config.episodes_per_task)]
  return episodes, videos


def save_videos(videos: dict[tuple[str, int], list[np.ndarray]], out_dir: str, fps: int) -> list[str]:
  """Writes each rollout as `<task>_<index>.gif`; returns the paths."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top
  paths = []
  for (task, index), frames in videos.items():
    path = os.path.join(out_dir, f"{task}_{index}.gif")
    imageio.mimsave(path, [np.asarray(f) for f in frames], duration=1.0 / fps, loop=0)
    paths.append(path)
  return paths


def evaluate(policy: Policy, tasks: Sequence[str], config: EvalConfig, out_dir: str | None = None,
             name: str = "eval",
             env_factory: Callable[[str, metaworld_env.EnvConfig], Any] = (
                 metaworld_env.make_env)) -> dict[str, Any]:
  """Runs the episodes, summarizes them and, with `out_dir`, writes the report.

  Files: `<name>.json` (summary, config and every episode), `<name>.png` (bar plot) and
  `<name>_videos/*.gif`.
  """
  episodes, videos = run_episodes(policy, tasks, config, env_factory)
  result = summary_lib.summarize(episodes)
  result.update(name=name, tasks=list(tasks), config=dataclasses.asdict(config),
                episode_records=episodes)
  if out_dir:
    summary_lib.write_evaluation(result, out_dir, name)
    if videos:
      video_dir = os.path.join(out_dir, f"{name}_videos")
      os.makedirs(video_dir, exist_ok=True)
      result["videos"] = save_videos(videos, video_dir, config.video_fps)
  log.info("%s", summary_lib.headline(name, result))
  return result


def evaluate_variants(policy: Policy, suite: str, config: EvalConfig, out_dir: str | None = None,
                      variants: Sequence[str] = VARIANTS, tasks: Sequence[str] | None = None,
                      held_out_tasks: Sequence[str] | None = None,
                      episodes_per_variant: dict[str, int] | None = None
                      ) -> dict[str, dict[str, Any]]:
  """The evaluation variants of a suite.

  'seen': the training tasks with training paraphrases; 'paraphrased': the same tasks with
  held-out paraphrases; 'held_out_tasks': `metaworld_env.HELD_OUT_TASKS[suite]` with training
  paraphrases (the task itself was never trained on); 'shift_<kind>': 'seen' with the environment's
  appearance shifted (`visual_shift.KINDS`). `tasks` / `held_out_tasks` replace the
  suite's lists (a run trained on a subset of the suite); `episodes_per_variant` overrides
  `config.episodes_per_task` per variant name.
  """
  train = tuple(tasks) if tasks is not None else metaworld_env.train_tasks(suite)
  held_out = (tuple(held_out_tasks) if held_out_tasks is not None
              else metaworld_env.HELD_OUT_TASKS[suite])
  results = {}
  for variant in variants:
    if variant not in VARIANTS + SHIFT_VARIANTS:
      raise ValueError(f"variant={variant!r} is unknown; use some of {VARIANTS + SHIFT_VARIANTS}")
    variant_tasks = held_out if variant == "held_out_tasks" else train
    if not variant_tasks:
      continue
    episodes = (episodes_per_variant or {}).get(variant, config.episodes_per_task)
    env = config.env
    if variant in SHIFT_VARIANTS:
      env = dataclasses.replace(env, visual_shift=variant[len("shift_"):])
    cfg = dataclasses.replace(
        config, instruction_variant="paraphrased" if variant == "paraphrased" else "seen",
        episodes_per_task=episodes, env=env)
    results[variant] = evaluate(policy, variant_tasks, cfg, out_dir, name=f"{suite}_{variant}")
  return results


class ExpertChunkPolicy:
  """Meta-World's scripted experts behind the chunked-policy interface (a reference policy).

  The expert is closed-loop, so its chunk repeats the current action H times; run it with
  `execute_steps=1` to reproduce the expert exactly.
  """

  def __init__(self, horizon: int = 4):
    from m2vla_jax.sim import demos  # pylint: disable=g-import-not-at-top
    self._experts: dict[str, Any] = {}
    self._make = demos.expert_for
    self._action = demos.expert_action
    self.horizon = horizon

  def __call__(self, obs: dict[str, Any]) -> np.ndarray:
    actions = []
    for task, state in zip(obs["task"], obs["privileged"]):
      if task not in self._experts:
        self._experts[task] = self._make(task)
      actions.append(self._action(self._experts[task], state))
    return np.repeat(np.stack(actions)[:, None], self.horizon, axis=1)


class RandomChunkPolicy:
  """Uniform random actions in [-1, 1] (a floor for success rates)."""

  def __init__(self, horizon: int = 4, seed: int = 0):
    self.horizon = horizon
    self._rng = np.random.default_rng(seed)

  def __call__(self, obs: dict[str, Any]) -> np.ndarray:
    return self._rng.uniform(-1.0, 1.0, (len(obs["task"]), self.horizon, 4))
