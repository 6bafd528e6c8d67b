"""Meta-World as the embedded default: demonstrations -> training -> closed-loop evaluation report.

Owns the glue that a training config with a `config.sim` section (configs/sim.py) needs around the
trainer:

    path = prepare_data(config)            # generate + write expert demos unless cached; registers
                                           # the dataset so the RLDS pipeline can read it
    trainer.train(config, workdir)
    report = evaluate_run(config, workdir) # newest checkpoint -> evaluate_variants -> files in
                                           # <workdir>/<config.sim.eval.out_subdir>/

`run(config, workdir)` does the three in sequence and records wall-clock per phase; the entry point
`python -m m2vla_jax.train --config=configs/sim.py --workdir=DIR` runs it.

`config.sim` fields (see configs/sim.py): suite, tasks (trained and evaluated as 'seen' /
'paraphrased'), held_out_tasks (never trained; 'held_out_tasks' variant), episodes_per_task
(demonstrations), data_dir (demo cache), image_size / primary_camera / wrist_camera ('' = none),
post_success_steps, dataset_name (derived by `name_from_config`: the demo cache's name,
`m2vla_jax.sim.common.demo_cache`), and `eval`: episodes_per_task, paraphrased_episodes,
held_out_episodes, shift_episodes (per task, for the 'shift_*' variants; default episodes_per_task),
batch_size, execute_steps, max_episode_steps, num_videos, variants, out_subdir.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections

from m2vla_jax.evaluation import summary as summary_lib
from m2vla_jax.sim.common import demo_cache

DEFAULT_DATA_DIR = demo_cache.default_data_dir("metaworld")


def demo_spec(sim: Mapping[str, Any]) -> dict[str, Any]:
  """The demo cache's spec of a `config.sim` section (`demos.generation_spec`)."""
  from m2vla_jax.sim.metaworld import demos  # pylint: disable=g-import-not-at-top
  return demos.generation_spec(
      sim["suite"], tuple(sim["tasks"]), int(sim["episodes_per_task"]),
      demos.DemoConfig(env=env_config(sim), post_success_steps=int(sim["post_success_steps"])))


def dataset_name(suite: str, tasks: Sequence[str], episodes_per_task: int, image_size: int,
                 primary_camera: str, wrist_camera: str, post_success_steps: int) -> str:
  """Demo cache name of these settings (`demos.cache_name`: readable prefix + hash of the spec)."""
  return name_from_config({"suite": suite, "tasks": tuple(tasks),
                           "episodes_per_task": episodes_per_task, "image_size": image_size,
                           "primary_camera": primary_camera, "wrist_camera": wrist_camera,
                           "post_success_steps": post_success_steps})


def name_from_config(sim: Mapping[str, Any]) -> str:
  from m2vla_jax.sim.metaworld import demos  # pylint: disable=g-import-not-at-top
  return demos.cache_name(demo_spec(sim))


def _check_sim(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if "sim" not in config:
    raise ValueError("config has no 'sim' section; use configs/sim.py (or add config.sim)")
  sim = config.sim
  if not sim.tasks:
    raise ValueError("config.sim.tasks is empty; name the Meta-World tasks to train on")
  demo_cache.check_name("config.sim.dataset_name", sim.dataset_name, name_from_config(sim),
                        "set it with workflow.name_from_config(config.sim)")
  if config.data.pipeline.datasets != sim.dataset_name:
    raise ValueError(f"config.data.pipeline.datasets={config.data.pipeline.datasets!r} must be "
                     f"config.sim.dataset_name={sim.dataset_name!r}")
  return sim


def env_config(sim: Mapping[str, Any], max_episode_steps: int | None = None):
  from m2vla_jax.sim.metaworld import env as metaworld_env  # pylint: disable=g-import-not-at-top
  return metaworld_env.EnvConfig(image_size=int(sim["image_size"]),
                                 primary_camera=sim["primary_camera"],
                                 wrist_camera=sim["wrist_camera"] or None,
                                 max_episode_steps=max_episode_steps)


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Generates and writes the demonstrations unless cached; registers them. Returns the dataset dir.

  The data registry entry (`demos.dataset_spec`) is registered in this process, so call this in
  the training process before `trainer.train`.
  """
  from m2vla_jax.sim.metaworld import demos  # pylint: disable=g-import-not-at-top
  sim = _check_sim(config)
  data_dir = config.data.pipeline.data_dir
  if not data_dir:
    raise ValueError("config.data.pipeline.data_dir is empty; set the demo cache directory")
  demo_config = demos.DemoConfig(env=env_config(sim),
                                 post_success_steps=int(sim.post_success_steps))
  path, stats = demos.generate_and_write(sim.suite, int(sim.episodes_per_task), data_dir,
                                         demo_config, tasks=tuple(sim.tasks),
                                         name=sim.dataset_name)
  if stats is not None:
    print(demos.stats_markdown(stats), flush=True)
  demo_cache.register(sim.dataset_name, demos.camera_keys(wrist=bool(sim.wrist_camera)))
  return path


def eval_config(sim: Mapping[str, Any]):
  from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld  # pylint: disable=g-import-not-at-top
  e = sim["eval"]
  return evaluate_metaworld.EvalConfig(
      env=env_config(sim, int(e["max_episode_steps"]) or None),
      episodes_per_task=int(e["episodes_per_task"]), batch_size=int(e["batch_size"]),
      execute_steps=int(e["execute_steps"]), num_videos=int(e["num_videos"]))


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, policy: Any = None
                 ) -> dict[str, Any]:
  """Closed-loop evaluation of the run's newest checkpoint; writes the report into the workdir.

  Files under `<workdir>/<config.sim.eval.out_subdir>/`: `<suite>_<variant>.json/.png`, rollout
  GIFs, `summary.json` (`summary.run_summary` with group 'variant': mean success, intervals,
  wall-clock, and the action-chunk latency of the policy's calls) and `summary.md`. `policy`: a
  ready policy callable (tests), default `SimPolicyAdapter.from_workdir(workdir)`. Returns the
  summary dict.
  """
  from m2vla_jax.sim.common import phases  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.common import policy_adapter  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld  # pylint: disable=g-import-not-at-top
  sim = _check_sim(config)
  out_dir, policy, wall = phases.open_evaluation(
      workdir, sim.eval.out_subdir, policy=policy,
      load=lambda: policy_adapter.SimPolicyAdapter.from_workdir(workdir, seed=int(config.seed)))
  episodes = {"seen": int(sim.eval.episodes_per_task),
              "paraphrased": int(sim.eval.paraphrased_episodes),
              "held_out_tasks": int(sim.eval.held_out_episodes)}
  for v in evaluate_metaworld.SHIFT_VARIANTS:
    episodes[v] = int(sim.eval.get("shift_episodes", sim.eval.episodes_per_task))
  variants = [v for v in sim.eval.variants if episodes.get(v, 1) > 0]
  results = {}
  for variant in variants:
    t = time.time()
    results.update(evaluate_metaworld.evaluate_variants(
        policy, sim.suite, eval_config(sim), out_dir, variants=[variant], tasks=tuple(sim.tasks),
        held_out_tasks=tuple(sim.held_out_tasks), episodes_per_variant=episodes))
    wall[f"eval_{variant}"] = time.time() - t
  latency = summary_lib.policy_latency(getattr(policy, "call_seconds", ()))
  summary = summary_lib.run_summary(workdir, sim.dataset_name, sim.tasks, "variant", results, wall,
                                    held_out_tasks=list(sim.held_out_tasks))
  if latency is not None:
    summary["policy_latency"] = latency
  return phases.write_evaluation(
      out_dir, summary, summary_lib.markdown(results, "variant"),
      [summary_lib.headline(f"{sim.suite} {v}", r, wall[f"eval_{v}"]) for v, r in results.items()]
      + ([f"action-chunk latency: median {latency['median_ms']:.0f} ms per call of "
          f"{latency['batch_size']} chunks (p90 {latency['p90_ms']:.0f} ms, {latency['calls']} calls)"]
         if latency else []))


def training_evaluators(config: ml_collections.ConfigDict) -> tuple[Any, ...]:
  """Closed-loop success on the training tasks every `config.sim.eval.every` steps (0: none), over
  `config.sim.eval.during_training_episodes` held-out-seed episodes per task: the learning curve the
  final evaluation's one point cannot show. Scalars `closed_loop/seen_success`, `.../ci95_lo|hi`."""
  every = int(config.sim.eval.get("every", 0))
  if not every:
    return ()
  from m2vla_jax.inference.policy import InferencePolicy  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.common import policy_adapter  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  sim = _check_sim(config)
  eval_cfg = dataclasses.replace(eval_config(sim), num_videos=0,
                                 episodes_per_task=int(sim.eval.during_training_episodes))
  adapters = []   # one adapter, so its jitted sample_actions compiles once; params change per call

  def run(snapshot: Any) -> dict[str, float]:
    if not adapters:
      loaded = InferencePolicy(snapshot.config, snapshot.params, snapshot.policy_state,
                               snapshot.statistics, policy=snapshot.policy)
      adapters.append(policy_adapter.SimPolicyAdapter.from_inference_policy(loaded, seed=int(config.seed)))
    adapter = adapters[0]
    adapter.params, adapter.state = snapshot.params, snapshot.policy_state
    result = evaluate_metaworld.evaluate(adapter, tuple(sim.tasks), eval_cfg, name="during_training")
    lo, hi = result["mean_ci95"]
    return {"seen_success": result["mean_success"], "ci95_lo": lo, "ci95_hi": hi}

  return (trainer.Evaluator("closed_loop", every, run),)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """prepare_data -> trainer.train (with `training_evaluators`) -> evaluate_run, with wall-clock per
  phase in the summary."""
  from m2vla_jax.sim.common import phases  # pylint: disable=g-import-not-at-top
  return phases.run_phases(
      config, workdir, prepare=[("prepare_data", lambda: prepare_data(config))],
      evaluate=lambda: evaluate_run(config, workdir),
      summary_path=os.path.join(workdir, config.sim.eval.out_subdir, "summary.json"),
      evaluators=training_evaluators(config))
