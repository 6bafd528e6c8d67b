"""Scripted LIBERO demonstrations, recorded as RLDS in OpenVLA's `libero_*_no_noops` layout.

Owns: running the scripted experts (sim/libero/experts.py) from a task's benchmark init states
0..n-1 with noise on their position deltas, keeping the episodes that reach the goal, dropping no-op
steps as OpenVLA's regeneration did, the written episodes, the demo cache's spec and name
(`sim.common.demo_cache`), the data-registry entry that reads them back (the registry's
`<suite>_no_noops` layout under the cache's name), and per-task statistics.

Init states n..49 are never demonstrated: the small run evaluates on them (held-out placements).

Episode layout (the input of `data.writer.write_rlds_dataset`; the keys and units of OpenVLA's
`modified_libero_rlds`, so `data/oxe/registry.py`'s libero entries read it unchanged):
```
{'observation': {'image': uint8 [T, S, S, 3],        agentview, rotated 180 degrees (as served)
                 'wrist_image': uint8 [T, S, S, 3],  eye-in-hand, rotated 180 degrees
                 'state': float32 [T, 8]},           eef xyz, eef axis-angle, 2 finger qpos
 'action': float32 [T, 7],                            OSC deltas as executed (clipped to [-1, 1]),
                                                      gripper -1 open / +1 close
 'reward': float32 [T] (1 at the last step), 'discount': float32 [T],
 'is_first', 'is_last', 'is_terminal': bool [T],
 'language_instruction': str,                          the task's language
 'episode_metadata': {'file_path': '<suite>/<task>/init_<i>', 'task_index', 'init_state',
                      'success_step'}}
```
OpenVLA's layout also has `joint_state` (7 arm joint angles); no registry entry reads it, so it is
not recorded. No-op steps (|delta| < 1e-4 with the gripper command unchanged; openvla's
`regenerate_libero_dataset.py`) are dropped from the record; OpenVLA replays the rest to re-render,
which we skip because a no-op moves nothing the next frame would show beyond settling. With position
noise the expert produces none; the statistics count them.

CLI: `python -m m2vla_jax.sim.libero.demos --suite=libero_spatial --tasks=0,1 --demos_per_task=N
--out=DIR [--worker_python=LIBERO_VENV/bin/python]`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from m2vla_jax.evaluation import closed_loop
from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.libero import env as libero_env
from m2vla_jax.sim.libero import experts

log = logging.getLogger(__name__)

Episode = dict[str, Any]
# openvla's regenerate_libero_dataset.py: an action is a no-op below this norm of its 6 deltas.
NOOP_THRESHOLD = 1e-4
DEFAULT_DATA_DIR = demo_cache.default_data_dir("libero")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """What to demonstrate and how.

  Attributes:
    env: suite and rendering (image_size, render_size); the demos' images are what a policy on this
      EnvConfig sees.
    tasks: task indices of the suite (scripted experts exist for LIBERO-Spatial and -Object).
    demos_per_task: benchmark init states 0..n-1 of each task are run (one attempt each); states
      n.. stay unseen for evaluation.
    noise_std: std of the Gaussian noise on the expert's position deltas (action units).
    seed: noise seed of init state 0 (init state i uses seed + i).
    steps_after_success: steps recorded after the goal first holds.
    workers: tasks recorded at once, one LIBERO worker process each.
  """
  env: libero_env.EnvConfig = libero_env.EnvConfig()
  tasks: tuple[int, ...] = (0, 1)
  demos_per_task: int = 30
  noise_std: float = 0.1
  seed: int = 0
  steps_after_success: int = 3
  workers: int = 2

  def __post_init__(self):
    if not self.tasks or min(self.tasks) < 0:
      raise ValueError(f"DemoConfig.tasks={self.tasks}: give task indices >= 0")
    closed_loop.require_positive(self, "demos_per_task", "workers")
    if self.noise_std < 0:
      raise ValueError(f"DemoConfig.noise_std={self.noise_std}; use >= 0 (0: no noise)")
    if self.steps_after_success < 0:
      raise ValueError(f"DemoConfig.steps_after_success={self.steps_after_success}; use >= 0")


@dataclasses.dataclass
class TaskStats:
  """The expert's outcome on one task's demonstrated init states."""
  task: str
  instruction: str = ""
  attempts: int = 0
  succeeded: int = 0
  noop_steps: int = 0
  mean_length: float = 0.0
  wall_s: float = 0.0

  @property
  def success_rate(self) -> float:
    return self.succeeded / max(self.attempts, 1)

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "success_rate": self.success_rate}


def noop_mask(actions: np.ndarray, threshold: float = NOOP_THRESHOLD) -> np.ndarray:
  """bool [T]: which actions openvla's regeneration drops. A step is a no-op when its 6 deltas have
  norm < threshold and its gripper command equals that of the last kept action (the first step: the
  deltas alone)."""
  keep_gripper = None
  mask = np.zeros(len(actions), bool)
  for t, action in enumerate(np.asarray(actions, np.float64)):
    small = np.linalg.norm(action[:-1]) < threshold
    mask[t] = small and (keep_gripper is None or action[-1] == keep_gripper)
    if not mask[t]:
      keep_gripper = action[-1]
  return mask


def episode_from_expert(result: Mapping[str, Any], suite: str, task_index: int) -> Episode | None:
  """One writer-format episode from `experts.run_expert_episode(..., record_every_step=True)`'s
  result, no-op steps dropped; None when the expert never reached the goal."""
  if not result["success"]:
    return None
  keep = ~noop_mask(result["actions"])
  images = np.asarray(result["images"])[keep]
  t = len(images)
  last = np.arange(t) == t - 1
  init = int(result["init_index"])
  return {
      "observation": {"image": images[:, 0], "wrist_image": images[:, 1],
                      "state": np.asarray(result["states"], np.float32)[keep]},
      "action": np.asarray(result["actions"], np.float32)[keep],
      "reward": last.astype(np.float32),
      "discount": np.ones((t,), np.float32),
      "is_first": np.arange(t) == 0,
      "is_last": last,
      "is_terminal": last.copy(),
      "language_instruction": str(result["instruction"]),
      "episode_metadata": {"file_path": f"{suite}/{task_index}/init_{init}",
                           "task_index": int(task_index), "init_state": init,
                           "success_step": int(result["success_step"])},
  }


def record_task(task_index: int, config: DemoConfig) -> tuple[list[Episode], TaskStats]:
  """Demonstrations of one task from init states 0..demos_per_task-1 (in its own worker process)."""
  suite = config.env.suite
  stats = TaskStats(f"{suite}/{task_index}")
  episodes: list[Episode] = []
  t0 = time.perf_counter()
  with libero_env.make_env(task_index, config.env) as env:
    if config.demos_per_task > env.num_init_states:
      raise ValueError(f"DemoConfig.demos_per_task={config.demos_per_task}: {suite} task "
                       f"{task_index} has {env.num_init_states} init states")
    stats.instruction = env.instruction
    for i in range(config.demos_per_task):
      args = (i, config.noise_std, config.seed + i, True, None, config.steps_after_success)
      result = (env.call("run_expert_episode", *args) if isinstance(env, libero_env.ProcessEnv)
                else experts.run_expert_episode(env, *args))
      stats.attempts += 1
      stats.noop_steps += int(noop_mask(result["actions"]).sum())
      episode = episode_from_expert(result, suite, task_index)
      if episode is not None:
        stats.succeeded += 1
        episodes.append(episode)
  stats.mean_length = float(np.mean([len(e["action"]) for e in episodes])) if episodes else 0.0
  stats.wall_s = time.perf_counter() - t0
  log.info("%s: %d/%d expert episodes reached the goal (%.0f s)", stats.task, stats.succeeded,
           stats.attempts, stats.wall_s)
  return episodes, stats


def generate(config: DemoConfig) -> tuple[list[Episode], list[TaskStats]]:
  """Every task's demonstrations, in task order, recorded `config.workers` tasks at a time."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=config.workers) as pool:
    # The threads only wait on their worker processes' pipes; the simulation runs in the workers.
    results = list(pool.map(lambda t: record_task(t, config), config.tasks))
  return [e for episodes, _ in results for e in episodes], [s for _, s in results]


def generation_spec(config: DemoConfig, image_encoding: str = "jpeg") -> dict[str, Any]:
  """Everything that changes the recorded demonstrations (the demo cache's spec): the protocol
  settings, the demos, and the expert's parameters (a retuned expert invalidates the cache)."""
  env = {k: v for k, v in dataclasses.asdict(config.env).items()
         if k not in ("isolate_process", "worker_python")}
  if env["reflections"]:
    # The protocol's rendering is implied, so caches recorded before the option existed stay valid.
    del env["reflections"]
  demo = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("env", "workers")}
  return demo_cache.canonical({"simulator": "libero", "env": env, **demo,
                               "expert": dataclasses.asdict(experts.ExpertConfig()),
                               "image_encoding": image_encoding})


def cache_name(spec: Mapping[str, Any]) -> str:
  """Demo cache name of a `generation_spec`: suite, image size, demos, tasks, and the hash."""
  env = spec["env"]
  return demo_cache.cache_name(f"{env['suite']}_scripted_{env['image_size']}px_"
                               f"n{spec['demos_per_task']}_t{len(spec['tasks'])}", spec)


def dataset_spec(name: str, suite: str):
  """The registry entry that reads demonstrations of `suite` written under `name`: the registry's
  `<suite>_no_noops` entry (OpenVLA's layout, gripper +1 = closed), renamed."""
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(oxe.get_spec(f"{suite}_no_noops"), name=name)


def register(name: str, suite: str) -> None:
  """Registers `dataset_spec(name, suite)` in this process, so the trainer's pipeline reads it."""
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  oxe.register(dataset_spec(name, suite), overwrite=True)


def stats_markdown(stats: Sequence[TaskStats]) -> str:
  lines = ["| task | instruction | expert success | no-op steps | mean demo length | wall s |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {s.task} | {s.instruction} | {s.succeeded}/{s.attempts} | {s.noop_steps} | "
            f"{s.mean_length:.1f} | {s.wall_s:.0f} |" for s in stats]
  return "\n".join(lines) + "\n"


def write_demos(episodes: Sequence[Episode], out_dir: str, name: str,
                stats: Sequence[TaskStats] = (), image_encoding: str = "jpeg") -> str:
  """Writes the episodes as RLDS `<out_dir>/<name>/1.0.0`, plus `stats.json` and `DEMOS.md`."""
  return demo_cache.write_dataset(
      episodes, out_dir, name, f"{name}: LIBERO scripted-expert demonstrations in OpenVLA's "
      f"no_noops layout (m2vla_jax.sim.libero.demos).", stats, stats_markdown, image_encoding)


def generate_and_write(config: DemoConfig, out_dir: str, name: str | None = None,
                       image_encoding: str = "jpeg") -> tuple[str, list[TaskStats] | None]:
  """Records and writes the demonstrations unless the cache has them (`demo_cache.ensure`).

  Returns (dataset directory, per-task statistics or None when the cache was used).
  """
  spec = generation_spec(config, image_encoding)
  name = name or cache_name(spec)

  def build():
    episodes, stats = generate(config)
    if not episodes:
      raise RuntimeError(f"the expert reached the goal in none of the {config.env.suite} tasks "
                         f"{list(config.tasks)}; no demonstrations to write")
    return write_demos(episodes, out_dir, name, stats, image_encoding), stats

  return demo_cache.ensure(out_dir, name, spec, build)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", default="libero_spatial",
                      choices=("libero_spatial", "libero_object"))
  parser.add_argument("--tasks", default="0,1", help="task indices, comma-separated")
  parser.add_argument("--demos_per_task", type=int, default=DemoConfig.demos_per_task)
  parser.add_argument("--noise_std", type=float, default=DemoConfig.noise_std)
  parser.add_argument("--image_size", type=int, default=libero_env.IMAGE_SIZE)
  parser.add_argument("--workers", type=int, default=DemoConfig.workers)
  parser.add_argument("--worker_python", default=None, help="interpreter with LIBERO installed")
  parser.add_argument("--out", default=DEFAULT_DATA_DIR)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  os.environ.setdefault("MUJOCO_GL", "egl")
  config = DemoConfig(env=libero_env.EnvConfig(suite=args.suite, image_size=args.image_size,
                                               worker_python=args.worker_python),
                      tasks=tuple(int(t) for t in args.tasks.split(",") if t),
                      demos_per_task=args.demos_per_task, noise_std=args.noise_std,
                      workers=args.workers)
  path, stats = generate_and_write(config, args.out)
  if stats is not None:
    print(stats_markdown(stats), flush=True)
  print(f"demonstrations: {path}", flush=True)


if __name__ == "__main__":
  main()
