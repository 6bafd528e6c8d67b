"""Closed-loop LIBERO evaluation under the standard protocol, scored per task with Wilson intervals.

Owns: the episodes of a suite (for each task, the benchmark init states 0..N-1 in order, as OpenVLA
and openpi run them), LIBERO behind the shared closed loop (`evaluation.closed_loop`: B
process-isolated environments stepped in parallel, each predicted chunk executed open loop for
`execute_steps` steps; success = the task's goal predicate, checked after every step), the report
(`<name>.json` with every episode, `<name>.png`, rollout GIFs, through `evaluation.summary`), and
the command line:

    # reference floor: uniform random actions, 2 init states of tasks 0 and 1
    python -m m2vla_jax.sim.libero.evaluate --suite=libero_spatial --policy=random --tasks=0,1 \\
        --episodes_per_task=2
    # a training run (its newest checkpoint) or an export bundle, in this process
    python -m m2vla_jax.sim.libero.evaluate --suite=libero_spatial --checkpoint=/tmp/run
    # a policy server (`python -m m2vla_jax.serve`): the model runs wherever the server does
    python -m m2vla_jax.sim.libero.evaluate --suite=libero_10 --server=ws://gpu-host:8000

The protocol itself (cameras, rotation, state, no-op steps, step limits, seeding) is
`sim/libero/env.py`'s. A trained policy (`--checkpoint`, `--server`) answers in the standardized units
of its training data (data/oxe/registry.py's libero entries: gripper 1 = open, 0 = closed);
`StandardizedPolicy` converts them to LIBERO's. The contract of the policy the loop calls:
```
policy(obs) -> float [B, H, 7]     H >= execute_steps; delta eef xyz, delta axis-angle, gripper
obs = {
  'images':      uint8   [B, 2, S, S, 3]   agentview, wrist (rotated 180 degrees, as trained)
  'image_mask':  bool    [B, 2]
  'state':       float32 [B, 8]            eef xyz, eef axis-angle, 2 gripper qpos
  'instruction': list[str] of B            the task's language
  'task':        list[str] of B            '<suite>/<task index>'
}
```
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import numpy as np

from m2vla_jax.data.oxe import spec as oxe_spec
from m2vla_jax.evaluation import closed_loop
from m2vla_jax.evaluation import summary as summary_lib
from m2vla_jax.sim.libero import env as libero_env

log = logging.getLogger(__name__)

# openpi's examples/libero/main.py re-plans every 5 steps (`replan_steps`).
EXECUTE_STEPS = 5


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Closed-loop LIBERO evaluation settings.

  Attributes:
    env: the protocol (suite, image sizes, no-op steps, step limit, seeding, worker interpreter).
    tasks: task indices of the suite; None = all of them.
    episodes_per_task: benchmark init states of each task, from `first_init_state` on (the
      protocol runs all 50).
    first_init_state: the first init state run; > 0 holds out the states a run was demonstrated on
      (sim/libero/demos.py demonstrates 0..n-1).
    batch_size: environments stepped together (one worker process each); the policy is called
      with this batch size.
    execute_steps: actions of each predicted chunk executed before re-planning.
    num_videos: rollouts saved as GIFs (the first init state of the first tasks).
    video_fps: frames per second of the GIFs (LIBERO controls at 20 Hz).
  """
  env: libero_env.EnvConfig = libero_env.EnvConfig()
  tasks: tuple[int, ...] | None = None
  episodes_per_task: int = 50
  first_init_state: int = 0
  batch_size: int = 4
  execute_steps: int = EXECUTE_STEPS
  num_videos: int = 3
  video_fps: int = 20

  def __post_init__(self):
    closed_loop.require_positive(self, "episodes_per_task", "batch_size", "execute_steps")
    if self.first_init_state < 0:
      raise ValueError(f"EvalConfig.first_init_state={self.first_init_state}; use >= 0")
    if self.tasks is not None and (not self.tasks or min(self.tasks) < 0):
      raise ValueError(f"EvalConfig.tasks={self.tasks}: give task indices >= 0, or None for all")


def task_name(suite: str, index: int) -> str:
  return f"{suite}/{index}"


class _Libero(closed_loop.StepEnvSimulator):
  """LIBERO behind `evaluation.closed_loop.Simulator`; an environment serves one task (both cameras
  render every step: robosuite's observables)."""
  action_dim = libero_env.ACTION_DIM

  def __init__(self, env_config: libero_env.EnvConfig,
               env_factory: Callable[[int, libero_env.EnvConfig], Any]):
    super().__init__()
    self._config, self._make = env_config, env_factory

  def open(self, task: str, env: Any | None) -> Any:
    index = int(task.rsplit("/", 1)[1])
    if env is not None and env.task_index == index:
      return env
    if env is not None:
      env.close()
    return self._make(index, self._config)

  def reset(self, env: Any, episode: closed_loop.Episode) -> dict[str, np.ndarray]:
    if episode.reset_arg >= env.num_init_states:
      raise ValueError(f"init state {episode.reset_arg} does not exist: {episode.task} has "
                       f"{env.num_init_states}; lower EvalConfig.episodes_per_task")
    return env.reset(episode.reset_arg)


def episodes_of(config: EvalConfig, num_tasks: int | None = None) -> list[closed_loop.Episode]:
  """The protocol's episodes: per task, `episodes_per_task` init states from `first_init_state` on
  (0..49: the standard protocol), tasks in order."""
  if config.tasks is None and num_tasks is None:
    raise ValueError("EvalConfig.tasks is None (all tasks): pass the suite's num_tasks")
  tasks = config.tasks if config.tasks is not None else tuple(range(num_tasks))
  suite = config.env.suite
  first = config.first_init_state
  return [closed_loop.Episode(task_name(suite, t), i, None, reset_arg=i,
                              record={"task_index": int(t), "init_state": i})
          for t in tasks for i in range(first, first + config.episodes_per_task)]


def suite_size(suite: str) -> int:
  """Number of tasks of a suite (10 for the four headline suites, 90 for libero_90)."""
  return {"libero_90": 90}.get(suite, 10)


def evaluate(policy: closed_loop.Policy, config: EvalConfig, out_dir: str | None = None,
             name: str | None = None,
             env_factory: Callable[[int, libero_env.EnvConfig], Any] = libero_env.make_env,
             ) -> dict[str, Any]:
  """Runs the episodes, summarizes them and, with `out_dir`, writes the report.

  Files: `<name>.json` (summary, config and every episode), `<name>.png` (bar plot) and
  `<name>_videos/*.gif`; `name` defaults to the suite.
  """
  name = name or config.env.suite
  episodes = episodes_of(config, suite_size(config.env.suite))
  video_tasks = {ep.task for ep in episodes[::config.episodes_per_task][:config.num_videos]}
  records, videos = closed_loop.run_episodes(
      policy, episodes, _Libero(config.env, env_factory), batch_size=config.batch_size,
      execute_steps=config.execute_steps,
      record_video=lambda ep: ep.task in video_tasks and ep.index == config.first_init_state)
  return closed_loop.report(records, videos, name, out_dir, config.video_fps, suite=config.env.suite,
                            tasks=sorted({r["task"] for r in records}), config=dataclasses.asdict(config),
                            instructions={r["task"]: r["instruction"] for r in records})


def RandomChunkPolicy(horizon: int = EXECUTE_STEPS, seed: int = 0) -> closed_loop.RandomChunkPolicy:  # pylint: disable=invalid-name
  """Uniform random LIBERO deltas and gripper in [-1, 1] (a floor for success rates)."""
  return closed_loop.RandomChunkPolicy(libero_env.ACTION_DIM, horizon, seed)


def env_actions(actions: np.ndarray) -> np.ndarray:
  """Standardized actions (data/oxe/registry.py: absolute gripper, 1 = open, 0 = closed) -> LIBERO's
  (-1 opens, +1 closes; the environment binarizes), the inverse of the libero_*_no_noops entries."""
  out = np.array(actions, np.float64)
  out[..., 6] = oxe_spec.signed_gripper(out[..., 6])
  return out


class StandardizedPolicy:
  """A policy trained on standardized LIBERO data (a checkpoint, a server), in LIBERO's action units."""

  def __init__(self, policy: closed_loop.Policy):
    self.policy = policy

  def __call__(self, obs: dict[str, Any]) -> np.ndarray:
    return env_actions(self.policy(obs))


def make_policy(kind: str, checkpoint: str | None = None, server: str | None = None,
                token: str | None = None, horizon: int = EXECUTE_STEPS) -> closed_loop.Policy:
  """'random', 'checkpoint' (a training run directory or an export bundle) or 'server'."""
  if kind == "random":
    return RandomChunkPolicy(horizon)
  if kind == "server":
    if not server:
      raise ValueError("--server=ws://host:port is required with --policy=server")
    from m2vla_jax.serving import client  # pylint: disable=g-import-not-at-top
    return StandardizedPolicy(client.RemotePolicy(server, token))
  if kind == "checkpoint":
    if not checkpoint:
      raise ValueError("--checkpoint is required with --policy=checkpoint (or use --policy=random "
                       "or --server=ws://host:port)")
    from m2vla_jax.sim.common import policy_adapter  # pylint: disable=g-import-not-at-top
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
      return StandardizedPolicy(policy_adapter.SimPolicyAdapter.from_workdir(checkpoint))
    return StandardizedPolicy(policy_adapter.SimPolicyAdapter.from_bundle(checkpoint))
  raise ValueError(f"--policy={kind!r}; use checkpoint, server or random")


_SUITE = flags.DEFINE_enum("suite", "libero_spatial", sorted(libero_env.SUITE_MAX_STEPS), "LIBERO suite.")
_POLICY = flags.DEFINE_enum("policy", None, ["checkpoint", "server", "random"],
                            "Default: 'server' with --server, else 'checkpoint'.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training run directory or export bundle.")
_SERVER = flags.DEFINE_string("server", None, "Policy server, ws://host:port.")
_TOKEN = flags.DEFINE_string("token", None, "The policy server's shared token, if it has one.")
_TASKS = flags.DEFINE_list("tasks", None, "Task indices of the suite (default: all).")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 50, "Init states per task (the protocol: 50).")
_FIRST_INIT = flags.DEFINE_integer("first_init_state", 0,
                                   "First init state (0: the protocol; a demonstrated run's held-out "
                                   "states start after its demos).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Environments (worker processes) stepped together.")
_EXECUTE = flags.DEFINE_integer("execute_steps", EXECUTE_STEPS, "Actions executed per chunk.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", libero_env.IMAGE_SIZE, "Policy image side, pixels.")
_WORKER_PYTHON = flags.DEFINE_string("worker_python", None,
                                     "Interpreter of the LIBERO worker processes (a separate venv).")
_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 3, "Rollouts saved as GIFs.")
_OUT = flags.DEFINE_string("out", "/tmp/m2vla_eval_libero", "Report directory.")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  config = EvalConfig(
      env=libero_env.EnvConfig(suite=_SUITE.value, image_size=_IMAGE_SIZE.value,
                               worker_python=_WORKER_PYTHON.value),
      tasks=None if _TASKS.value is None else tuple(int(t) for t in _TASKS.value),
      episodes_per_task=_EPISODES.value, first_init_state=_FIRST_INIT.value, batch_size=_BATCH.value, execute_steps=_EXECUTE.value,
      num_videos=_NUM_VIDEOS.value)
  kind = _POLICY.value or ("server" if _SERVER.value else "checkpoint")
  policy = make_policy(kind, _CHECKPOINT.value, _SERVER.value, _TOKEN.value, _EXECUTE.value)
  os.makedirs(_OUT.value, exist_ok=True)
  result = evaluate(policy, config, _OUT.value)
  print(summary_lib.headline(result["name"], result), flush=True)


def cli():
  """Console script `m2vla-evaluate-libero`."""
  app.run(main)


if __name__ == "__main__":
  cli()
