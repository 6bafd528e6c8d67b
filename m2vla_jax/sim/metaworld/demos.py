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

Episode layout: one dict per episode with a leading time axis T, the input format of
`m2vla_jax.data.writer.write_rlds_dataset`:
```
{'observation': {'image': uint8 [T, H, W, 3],         primary camera
                 'wrist_image': uint8 [T, H, W, 3],   present when a wrist camera is set
                 'state': float32 [T, 4]},            hand xyz + gripper opening
 'action': float32 [T, 4] in [-1, 1],
 'reward': float32 [T], 'discount': float32 [T],
 'is_first', 'is_last', 'is_terminal': bool [T],      first / last / last (the episode succeeded)
 'language_instruction': str,                          one training paraphrase per episode
 'episode_metadata': {'task': str, 'seed': int, 'first_success_step': int}}
```
`action` is the expert action clipped to Meta-World's action space (the environment clips the
same way, so the recorded action is exactly what was executed). `dataset_spec(name)` is the data
registry entry that reads the written dataset back; `generation_spec` / `cache_name` name the
demo cache (`m2vla_jax.sim.common.demo_cache`), which `generate_and_write` reuses or rebuilds.

CLI: `python -m m2vla_jax.sim.metaworld.demos --suite=mt10 --episodes_per_task=N --out=DIR`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
import time
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from m2vla_jax.sim.metaworld import instructions
from m2vla_jax.sim.metaworld import env as metaworld_env
from m2vla_jax.sim.common import demo_cache

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


def expert_action(expert: Any, privileged: np.ndarray) -> np.ndarray:
  """The expert's action for a 39-d Meta-World state, clipped to [-1, 1] (float64 [4])."""
  with warnings.catch_warnings():
    # The experts warn whenever their P-controller saturates; the action is clipped anyway.
    warnings.filterwarnings("ignore", message="Constant", category=UserWarning)
    action = expert.get_action(privileged)
  return np.clip(np.asarray(action, np.float64), -1.0, 1.0)


def _assemble(steps: list[tuple[dict[str, np.ndarray], np.ndarray, float]], instruction: str,
              has_wrist: bool, metadata: dict[str, Any]) -> Episode:
  """Stacks (observation, action, reward) triples into one writer-format episode."""
  t = len(steps)
  observation = {"image": np.stack([o["images"][0] for o, _, _ in steps]),
                 "state": np.stack([o["state"] for o, _, _ in steps]).astype(np.float32)}
  if has_wrist:
    observation["wrist_image"] = np.stack([o["images"][1] for o, _, _ in steps])
  last = np.arange(t) == t - 1
  return {
      "observation": observation,
      "action": np.stack([a for _, a, _ in steps]).astype(np.float32),
      "reward": np.array([r for _, _, r in steps], np.float32),
      "discount": np.ones((t,), np.float32),
      "is_first": np.arange(t) == 0,
      "is_last": last,
      "is_terminal": last.copy(),
      "language_instruction": instruction,
      "episode_metadata": metadata,
  }


def record_episode(env: Any, expert: Any, seed: int, instruction: str, config: DemoConfig
                   ) -> tuple[Episode | None, dict[str, Any]]:
  """Runs the expert once from `seed` in `env` (a MetaWorldEnv or ProcessEnv).

  Returns:
    (episode or None when the expert never succeeded, outcome dict with keys
    'success_any', 'success_last' (None unless measured), 'first_success_step', 'crash').
  """
  has_wrist = config.env.wrist_camera is not None
  outcome = {"success_any": False, "success_last": None, "first_success_step": None, "crash": None}
  steps: list[tuple[dict[str, np.ndarray], np.ndarray, float]] = []
  try:
    obs = env.reset(seed, render=True)
    recording, post_left, success = True, config.post_success_steps, False
    while True:
      action = expert_action(expert, obs["privileged"])
      if recording:
        current = obs
      obs, reward, success, truncated, _ = env.step(action, render=recording)
      if recording:
        # A step kept after the first success must itself still be successful.
        if outcome["first_success_step"] is not None and not success:
          recording = False
        else:
          steps.append((current, action, reward))
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
  metadata = {"task": env.task, "seed": int(seed),
              "first_success_step": int(outcome["first_success_step"])}
  return _assemble(steps, instruction, has_wrist, metadata), outcome


def generate_task_demos(task: str, num_episodes: int, config: DemoConfig = DemoConfig(),
                        instruction_seed: int = 0, env: Any = None
                        ) -> tuple[list[Episode], TaskStats]:
  """Up to `num_episodes` successful expert demonstrations of one task.

  Attempts seeds `episode_seed(task, i, 'train')` for i = 0, 1, ... until `num_episodes`
  succeeded or `num_episodes * max_attempts_per_episode` were tried. With `measure_last_step`,
  exactly `num_episodes` attempts run (statistics are over a fixed set of seeds). `env`: an open
  environment to reuse (a ProcessEnv is switched to `task`); by default one is made and closed.
  """
  if num_episodes < 1:
    raise ValueError(f"num_episodes={num_episodes} must be >= 1")
  rng = np.random.default_rng([instruction_seed, metaworld_env.episode_seed(task, 0)])
  expert = expert_for(task)
  stats = TaskStats(task, succeeded_last=0 if config.measure_last_step else None)
  episodes: list[Episode] = []
  max_attempts = (num_episodes if config.measure_last_step
                  else num_episodes * config.max_attempts_per_episode)
  own_env = env is None
  if own_env:
    env = metaworld_env.make_env(task, config.env)
  elif env.task != task:
    env.set_task(task)
  try:
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
  finally:
    if own_env:
      env.close()
  stats.mean_length = float(np.mean([len(e["action"]) for e in episodes])) if episodes else 0.0
  return episodes, stats


def generate_demos(tasks: Sequence[str], episodes_per_task: int, config: DemoConfig = DemoConfig(),
                   instruction_seed: int = 0) -> tuple[list[Episode], list[TaskStats]]:
  """Demonstrations for several tasks, concatenated in task order, and per-task statistics."""
  all_episodes, all_stats = [], []
  env = metaworld_env.make_env(tasks[0], config.env) if config.env.isolate_process else None
  try:
    for task in tasks:
      t0 = time.time()
      episodes, stats = generate_task_demos(task, episodes_per_task, config, instruction_seed, env)
      log.info("%s: %d/%d expert attempts succeeded, %d discarded (%.1fs)", task,
               stats.succeeded_any, stats.attempts, stats.discarded, time.time() - t0)
      all_episodes += episodes
      all_stats.append(stats)
  finally:
    if env is not None:
      env.close()
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


def dataset_spec(name: str, wrist: bool = True):
  """The data-registry entry that reads demonstrations written by `write_demos` under `name`.

  `wrist`: the demonstrations were recorded with a wrist camera (`EnvConfig.wrist_camera`). The
  gripper action is Meta-World's continuous effort in [-1, 1] (the experts use intermediate
  values), declared continuous like every simulator's (`demo_cache.dataset_spec`).
  """
  return demo_cache.dataset_spec(name, camera_keys(wrist))


def camera_keys(wrist: bool = True) -> dict[str, str]:
  """{pipeline camera slot: episode image key} of the recorded cameras."""
  return {"primary": "image", "wrist": "wrist_image"} if wrist else {"primary": "image"}


# DemoConfig / EnvConfig fields that do not change the recorded episodes (statistics only, and how
# the environment process is hosted): left out of the spec, so they do not invalidate a cache.
_NOT_IN_SPEC = ("measure_last_step", "isolate_process")


def generation_spec(suite: str, tasks: Sequence[str], episodes_per_task: int,
                    config: DemoConfig = DemoConfig(), image_encoding: str = "jpeg"
                    ) -> dict[str, Any]:
  """Everything that changes the recorded demonstrations: the demo cache's spec (demo_cache)."""
  env = {k: v for k, v in dataclasses.asdict(config.env).items() if k not in _NOT_IN_SPEC}
  demo = {k: v for k, v in dataclasses.asdict(config).items()
          if k != "env" and k not in _NOT_IN_SPEC}
  return demo_cache.canonical({"simulator": "metaworld", "suite": suite, "tasks": list(tasks),
                               "episodes_per_task": int(episodes_per_task), "env": env, **demo,
                               "image_encoding": image_encoding})


def cache_name(spec: Mapping[str, Any]) -> str:
  """Demo cache name of a `generation_spec`: suite, cameras, size, demos and tasks, and the hash."""
  env = spec["env"]
  return demo_cache.cache_name(
      f"metaworld_{spec['suite']}_{env['primary_camera']}_{env['wrist_camera'] or 'nowrist'}_"
      f"{env['image_size']}px_n{spec['episodes_per_task']}_t{len(spec['tasks'])}", spec)


def write_demos(episodes: Sequence[Episode], out_dir: str, name: str,
                stats: Sequence[TaskStats] = (), image_encoding: str = "jpeg") -> str:
  """Writes episodes as an RLDS dataset `<out_dir>/<name>/1.0.0` plus `stats.json`/`DEMOS.md`."""
  return demo_cache.write_dataset(
      episodes, out_dir, name, f"{name}: Meta-World scripted-expert demonstrations cut at first "
      f"success (m2vla_jax.sim.metaworld.demos).", stats, stats_markdown, image_encoding)


def generate_and_write(suite: str, episodes_per_task: int, out_dir: str,
                       config: DemoConfig = DemoConfig(), tasks: Sequence[str] | None = None,
                       name: str | None = None, overwrite: bool = False,
                       image_encoding: str = "jpeg") -> tuple[str, list[TaskStats] | None]:
  """Generates and writes a suite's demonstrations unless cached (`demo_cache.ensure`).

  Tasks default to `metaworld_env.train_tasks(suite)` (held-out tasks never get demonstrations);
  `name` defaults to `cache_name` of the settings. Returns (dataset directory, per-task stats or
  None when the cache was used).
  """
  tasks = tuple(tasks) if tasks is not None else metaworld_env.train_tasks(suite)
  spec = generation_spec(suite, tasks, episodes_per_task, config, image_encoding)
  name = name or cache_name(spec)
  if overwrite and os.path.exists(os.path.join(out_dir, name)):
    shutil.rmtree(os.path.join(out_dir, name))

  def build():
    episodes, stats = generate_demos(tasks, episodes_per_task, config)
    if not episodes:
      raise RuntimeError(f"no successful expert demonstration for any of {list(tasks)}")
    return write_demos(episodes, out_dir, name, stats, image_encoding), stats

  return demo_cache.ensure(out_dir, name, spec, build)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--suite", default="mt10", choices=sorted(metaworld_env.SUITES))
  parser.add_argument("--tasks", default="", help="comma-separated task names (default: the "
                      "suite's training tasks)")
  parser.add_argument("--episodes_per_task", type=int, default=50)
  parser.add_argument("--out", required=True, help="cache directory for the RLDS dataset")
  parser.add_argument("--name", default=None, help="dataset name (default: from the settings)")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--primary_camera", default="corner")
  parser.add_argument("--wrist_camera", default="gripperPOV", help="'' for none")
  parser.add_argument("--post_success_steps", type=int, default=DemoConfig.post_success_steps)
  parser.add_argument("--measure_last_step", action="store_true",
                      help="run each expert to the step limit to report success at the last step")
  parser.add_argument("--image_encoding", default="jpeg", choices=("jpeg", "png"))
  parser.add_argument("--overwrite", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  config = DemoConfig(
      env=metaworld_env.EnvConfig(image_size=args.image_size, primary_camera=args.primary_camera,
                                  wrist_camera=args.wrist_camera or None),
      post_success_steps=args.post_success_steps, measure_last_step=args.measure_last_step)
  tasks = [t for t in args.tasks.split(",") if t] or None
  path, stats = generate_and_write(args.suite, args.episodes_per_task, args.out, config, tasks,
                                   args.name, args.overwrite, args.image_encoding)
  if stats is not None:
    print(stats_markdown(stats))
  print(path)


if __name__ == "__main__":
  main(sys.argv[1:])
