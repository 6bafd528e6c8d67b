"""Closed-loop Meta-World evaluation of a chunked policy, scored the benchmark's way.

Owns: which episodes run (N per task from held-out seeds, `episode_seed(task, i, 'eval')`, disjoint
from the demonstration seeds; the benchmark's step limit), Meta-World behind the shared closed loop
(`evaluation.closed_loop`: B environments batched, each chunk executed open loop for
`execute_steps` steps; success as Meta-World scores it, at the first step whose
`info['success']` is True, where the episode ends), and the report (JSON and bar plot with Wilson
intervals through `m2vla_jax.evaluation.summary`; rollout GIFs). Evaluation variants:
instructions seen in training, held-out paraphrases, held-out tasks, and the seen tasks under visual
shifts never seen in training ('shift_camera', 'shift_lighting', 'shift_colors', 'shift_all';
`sim/metaworld/visual_shift.py`).

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

import dataclasses
import logging
from typing import Any, Callable, Sequence

import numpy as np

from m2vla_jax.evaluation import closed_loop
from m2vla_jax.sim.metaworld import instructions
from m2vla_jax.sim.metaworld import env as metaworld_env
from m2vla_jax.sim.metaworld import visual_shift

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
    closed_loop.require_positive(self, "episodes_per_task", "batch_size", "execute_steps")
    if self.instruction_variant not in ("seen", "paraphrased"):
      raise ValueError(f"EvalConfig.instruction_variant={self.instruction_variant!r}; use 'seen' "
                       f"or 'paraphrased'")


def _instruction(task: str, index: int, variant: str) -> str:
  pool = (instructions.held_out_instructions(task) if variant == "paraphrased"
          else instructions.train_instructions(task))
  return pool[index % len(pool)]


class _MetaWorld(closed_loop.StepEnvSimulator):
  """Meta-World behind `evaluation.closed_loop.Simulator`: a worker process is kept across tasks
  (`set_task`), and frames nobody reads are not rendered."""
  action_dim = metaworld_env.ACTION_DIM

  def __init__(self, env_factory: Callable[[str, metaworld_env.EnvConfig], Any],
               env_config: metaworld_env.EnvConfig):
    super().__init__()
    self._make, self._config = env_factory, env_config

  def open(self, task: str, env: Any | None) -> Any:
    if env is not None and env.task != task:
      if hasattr(env, "set_task"):  # a ProcessEnv keeps its worker process
        env.set_task(task)
      else:
        env.close()
        env = None
    return env if env is not None else self._make(task, self._config)

  def reset(self, env: Any, episode: closed_loop.Episode) -> dict[str, np.ndarray]:
    return env.reset(episode.reset_arg, render=True)

  def step_options(self, render: bool) -> dict[str, Any]:
    return {"render": render}


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
  episodes = []
  for task in tasks:
    for i in range(config.episodes_per_task):
      seed = metaworld_env.episode_seed(task, i, "eval")
      episodes.append(closed_loop.Episode(task, i, _instruction(task, i, config.instruction_variant),
                                          reset_arg=seed, record={"seed": seed}))
  video_tasks = set(list(tasks)[:config.num_videos])
  return closed_loop.run_episodes(
      policy, episodes, _MetaWorld(env_factory, config.env), batch_size=config.batch_size,
      execute_steps=config.execute_steps,
      record_video=lambda ep: ep.task in video_tasks and ep.index == 0)


def evaluate(policy: Policy, tasks: Sequence[str], config: EvalConfig, out_dir: str | None = None,
             name: str = "eval",
             env_factory: Callable[[str, metaworld_env.EnvConfig], Any] = (
                 metaworld_env.make_env)) -> dict[str, Any]:
  """Runs the episodes, summarizes them and, with `out_dir`, writes the report.

  Files: `<name>.json` (summary, config and every episode), `<name>.png` (bar plot) and
  `<name>_videos/*.gif`.
  """
  episodes, videos = run_episodes(policy, tasks, config, env_factory)
  return closed_loop.report(episodes, videos, name, out_dir, config.video_fps, tasks=list(tasks),
                            config=dataclasses.asdict(config))


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
    from m2vla_jax.sim.metaworld import demos  # pylint: disable=g-import-not-at-top
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


def RandomChunkPolicy(horizon: int = 4, seed: int = 0) -> closed_loop.RandomChunkPolicy:  # pylint: disable=invalid-name
  """Uniform random Meta-World actions in [-1, 1] (a floor for success rates)."""
  return closed_loop.RandomChunkPolicy(metaworld_env.ACTION_DIM, horizon, seed)
