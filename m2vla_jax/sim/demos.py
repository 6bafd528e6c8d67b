"""Scripted-expert demonstrations for Meta-World, recorded as RLDS-style episodes.

Owns: running Meta-World's scripted experts (`metaworld.policies`) from seeded initial states
(`metaworld_env.episode_seed(task, i, 'train')`), recording images, proprio, actions and a
training paraphrase of the task instruction, cutting each episode at the expert's first success,
discarding episodes that never succeed, and per-task statistics.

Why episodes are cut: Meta-World's evaluation ends an episode at the first `info['success']`,
while its experts keep moving afterwards and often undo the success (door, drawer, window tasks
swing past the goal). A demonstration therefore ends at the first success plus at most
`post_success_steps` further steps, and only while the success still holds, so it never teaches
the motion that undoes the task.

Episode layout (one dict per episode, numpy values):
```
{'steps': [{'observation': {'image': uint8 [H, W, 3],        primary camera
                            'wrist_image': uint8 [H, W, 3],  present when a wrist camera is set
                            'state': float32 [4]},           hand xyz + gripper opening
            'action': float32 [4] in [-1, 1],
            'reward': float32, 'discount': float32,
            'is_first': bool, 'is_last': bool, 'is_terminal': bool,
            'language_instruction': str}, ...],
 'episode_metadata': {'task': str, 'seed': int, 'first_success_step': int}}
```
`action` is the expert action clipped to Meta-World's action space (the environment clips the
same way, so the recorded action is exactly what was executed).

CLI: `python -m m2vla_jax.sim.demos --suite=mt10 --episodes_per_task=N --out=DIR`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from m2vla_jax.sim import instructions
from m2vla_jax.sim import metaworld_env

log = logging.getLogger(__name__)

Episode = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Demonstration generation settings.

  Attributes:
    env: rendering and episode length (EnvConfig).
    post_success_steps: steps kept after the first success while success still holds.
    max_attempts_per_episode: stop a task after `episodes * this` attempts even if fewer
      successful demonstrations were collected.
    measure_last_step: after the cut, keep running the expert (without rendering) to the step
      limit to report whether success still holds at the last step (statistics only).
  """
  env: metaworld_env.EnvConfig = metaworld_env.EnvConfig()
  post_success_steps: int = 3
  max_attempts_per_episode: int = 3
  measure_last_step: bool = False

  def __post_init__(self):
    if self.post_success_steps < 0:
      raise ValueError(f"DemoConfig.post_success_steps={self.post_success_steps} must be >= 0")
    if self.max_attempts_per_episode < 1:
      raise ValueError(f"DemoConfig.max_attempts_per_episode={self.max_attempts_per_episode} "
                       f"must be >= 1")


@dataclasses.dataclass
class TaskStats:
  """Outcome of the expert on one task.

  `succeeded_any` counts attempts with success at some step (the benchmark's criterion),
  `succeeded_last` those still successful at the step limit (only with measure_last_step).
  """
  task: str
  attempts: int = 0
  succeeded_any: int = 0
  succeeded_last: int | None = None
  discarded: int = 0
  crashed: int = 0
  mean_length: float = 0.0

  @property
  def success_rate(self) -> float:
    return self.succeeded_any / max(self.attempts, 1)

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "success_rate": self.success_rate}


def expert_for(task: str):
  """Meta-World's scripted expert for a task (an object with `get_action(obs39)`)."""
  from metaworld.policies import ENV_POLICY_MAP  # pylint: disable=g-import-not-at-top
  if task not in ENV_POLICY_MAP:
    raise ValueError(f"task={task!r} has no scripted expert in metaworld.policies.ENV_POLICY_MAP")
  return ENV_POLICY_MAP[task]()


def _step_record(obs: dict[str, np.ndarray], action: np.ndarray, reward: float,
                 instruction: str, has_wrist: bool) -> dict[str, Any]:
  observation = {"image": obs["images"][0], "state": obs["state"]}
  if has_wrist:
    observation["wrist_image"] = obs["images"][1]
  return {
      "observation": observation,
      "action": action.astype(np.float32),
      "reward": np.float32(reward),
      "discount": np.float32(1.0),
      "is_first": False, "is_last": False, "is_terminal": False,
      "language_instruction": instruction,
  }


def record_episode(env: metaworld_env.MetaWorldEnv, expert: Any, seed: int, instruction: str,
                   config: DemoConfig) -> tuple[Episode | None, dict[str, Any]]:
  """Runs the expert once from `seed`.

  Returns:
    (episode or None when the expert never succeeded, outcome dict with keys
    'success_any', 'success_last' (None unless measured), 'first_success_step', 'crash').
  """
  has_wrist = config.env.wrist_camera is not None
  outcome = {"success_any": False, "success_last": None, "first_success_step": None, "crash": None}
  steps: list[dict[str, Any]] = []
  try:
    obs = env.reset(seed, render=True)
    recording, post_left, success = True, config.post_success_steps, False
    while True:
      action = np.clip(np.asarray(expert.get_action(obs["privileged"]), np.float64), -1.0, 1.0)
      if recording:
        current = obs
      obs, reward, success, truncated, _ = env.step(action, render=recording)
      if recording:
        # A step kept after the first success must itself still be successful.
        if outcome["first_success_step"] is not None and not success:
          recording = False
        else:
          steps.append(_step_record(current, action, reward, instruction, has_wrist))
      if success and outcome["first_success_step"] is None:
        outcome["first_success_step"] = env.steps - 1
        outcome["success_any"] = True
      elif outcome["first_success_step"] is not None and recording:
        post_left -= 1
      if outcome["first_success_step"] is not None and post_left <= 0:
        recording = False
      if truncated or (not recording and not config.measure_last_step):
        break
  except metaworld_env.SimulationError as e:
    log.warning("%s seed %d: expert episode crashed: %s", env.task, seed, e)
    outcome["crash"] = str(e)
    return None, outcome
  if config.measure_last_step:
    outcome["success_last"] = bool(success and truncated)
  if not outcome["success_any"]:
    return None, outcome
  steps[0]["is_first"] = True
  steps[-1]["is_last"] = steps[-1]["is_terminal"] = True
  return ({"steps": steps,
           "episode_metadata": {"task": env.task, "seed": int(seed),
                                "first_success_step": int(outcome["first_success_step"])}},
          outcome)


def generate_task_demos(task: str, num_episodes: int, config: DemoConfig = DemoConfig(),
                        instruction_seed: int = 0) -> tuple[list[Episode], TaskStats]:
  """Up to `num_episodes` successful expert demonstrations of one task.

  Attempts seeds `episode_seed(task, i, 'train')` for i = 0, 1, ... until `num_episodes`
  succeeded or `num_episodes * max_attempts_per_episode` were tried. With `measure_last_step`,
  exactly `num_episodes` attempts run (statistics are over a fixed set of seeds).
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes={num_episodes} must be >= 1")
  rng = np.random.default_rng([instruction_seed, metaworld_env.episode_seed(task, 0)])
  expert = expert_for(task)
  stats = TaskStats(task, succeeded_last=0 if config.measure_last_step else None)
  episodes: list[Episode] = []
  max_attempts = (num_episodes if config.measure_last_step
                  else num_episodes * config.max_attempts_per_episode)
  with metaworld_env.MetaWorldEnv(task, config.env) as env:
    while len(episodes) < num_episodes and stats.attempts < max_attempts:
      seed = metaworld_env.episode_seed(task, stats.attempts, "train")
      instruction = instructions.sample_instruction(task, rng)
      episode, outcome = record_episode(env, expert, seed, instruction, config)
      stats.attempts += 1
      stats.succeeded_any += int(outcome["success_any"])
      stats.crashed += int(outcome["crash"] is not None)
      if config.measure_last_step:
        stats.succeeded_last += int(bool(outcome["success_last"]))
      if episode is None:
        stats.discarded += 1
      else:
        episodes.append(episode)
  stats.mean_length = float(np.mean([len(e["steps"]) for e in episodes])) if episodes else 0.0
  return episodes, stats


def generate_demos(tasks: Sequence[str], episodes_per_task: int, config: DemoConfig = DemoConfig(),
                   instruction_seed: int = 0) -> tuple[list[Episode], list[TaskStats]]:
  """Demonstrations for several tasks, concatenated in task order, and per-task statistics."""
  all_episodes, all_stats = [], []
  for task in tasks:
    t0 = time.time()
    episodes, stats = generate_task_demos(task, episodes_per_task, config, instruction_seed)
    log.info("%s: %d/%d expert attempts succeeded, %d discarded (%.1fs)", task,
             stats.succeeded_any, stats.attempts, stats.discarded, time.time() - t0)
    all_episodes += episodes
    all_stats.append(stats)
  return all_episodes, all_stats


def stats_markdown(stats: Sequence[TaskStats]) -> str:
  """A markdown table of per-task expert success (at some step, at the last step)."""
  lines = ["| task | attempts | success at some step | success at last step | discarded | "
           "mean demo length |", "|---|---|---|---|---|---|"]
  for s in stats:
    last = "n/a" if s.succeeded_last is None else f"{s.succeeded_last / max(s.attempts, 1):.0%}"
    lines.append(f"| {s.task} | {s.attempts} | {s.success_rate:.0%} | {last} | {s.discarded} | "
                 f"{s.mean_length:.1f} |")
  attempts = sum(s.attempts for s in stats)
  anyr = sum(s.succeeded_any for s in stats) / max(attempts, 1)
  last = ("n/a" if any(s.succeeded_last is None for s in stats)
          else f"{sum(s.succeeded_last for s in stats) / max(attempts, 1):.0%}")
  lines.append(f"| **all** | {attempts} | {anyr:.0%} | {last} | "
               f"{sum(s.discarded for s in stats)} | |")
  return "\n".join(lines) + "\n"
