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
post_success_steps, dataset_name (derived by `dataset_name`), and `eval`: episodes_per_task,
paraphrased_episodes, held_out_episodes, batch_size, execute_steps, max_episode_steps, num_videos,
variants, out_subdir.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Mapping, Sequence

import ml_collections

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "m2vla_jax", "metaworld_demos")


def dataset_name(suite: str, tasks: Sequence[str], episodes_per_task: int, image_size: int,
                 primary_camera: str, wrist_camera: str, post_success_steps: int) -> str:
  """Cache name: every setting that changes the recorded data, the task list as a checksum."""
  task_sum = zlib.crc32(",".join(tasks).encode())
  wrist = wrist_camera or "nowrist"
  return (f"metaworld_{suite}_{primary_camera}_{wrist}_{image_size}px_post{post_success_steps}_"
          f"n{episodes_per_task}_t{len(tasks)}x{task_sum:08x}").lower()


def name_from_config(sim: Mapping[str, Any]) -> str:
  return dataset_name(sim["suite"], tuple(sim["tasks"]), int(sim["episodes_per_task"]),
                      int(sim["image_size"]), sim["primary_camera"], sim["wrist_camera"],
                      int(sim["post_success_steps"]))


def _check_sim(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if "sim" not in config:
    raise ValueError("config has no 'sim' section; use configs/sim.py (or add config.sim)")
  sim = config.sim
  if not sim.tasks:
    raise ValueError("config.sim.tasks is empty; name the Meta-World tasks to train on")
  expected = name_from_config(sim)
  if sim.dataset_name != expected:
    raise ValueError(f"config.sim.dataset_name={sim.dataset_name!r} does not match the demo "
                     f"settings ({expected!r}); set it with workflow.name_from_config(config.sim)")
  if config.data.pipeline.datasets != sim.dataset_name:
    raise ValueError(f"config.data.pipeline.datasets={config.data.pipeline.datasets!r} must be "
                     f"config.sim.dataset_name={sim.dataset_name!r}")
  return sim


def env_config(sim: Mapping[str, Any], max_episode_steps: int | None = None):
  from m2vla_jax.sim import metaworld_env  # pylint: disable=g-import-not-at-top
  return metaworld_env.EnvConfig(image_size=int(sim["image_size"]),
                                 primary_camera=sim["primary_camera"],
                                 wrist_camera=sim["wrist_camera"] or None,
                                 max_episode_steps=max_episode_steps)


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Generates and writes the demonstrations unless cached; registers them. Returns the dataset dir.

  The data registry entry (`demos.dataset_spec`) is registered in this process, so call this in
  the training process before `trainer.train`.
  """
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim import demos  # pylint: disable=g-import-not-at-top
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
  oxe.register(demos.dataset_spec(sim.dataset_name, wrist=bool(sim.wrist_camera)), overwrite=True)
  return path


def eval_config(sim: Mapping[str, Any]):
  from m2vla_jax.sim import evaluate_metaworld  # pylint: disable=g-import-not-at-top
  e = sim["eval"]
  return evaluate_metaworld.EvalConfig(
      env=env_config(sim, int(e["max_episode_steps"]) or None),
      episodes_per_task=int(e["episodes_per_task"]), batch_size=int(e["batch_size"]),
      execute_steps=int(e["execute_steps"]), num_videos=int(e["num_videos"]))


def summary_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
  """One table: variant x task success (successes/episodes) and the mean with its 95% interval."""
  lines = ["| variant | task | success | episodes | 95% CI |", "|---|---|---|---|---|"]
  for variant, r in results.items():
    for task, t in r["per_task"].items():
      lo, hi = t["ci95"]
      lines.append(f"| {variant} | {task} | {t['success_rate']:.2f} | {t['episodes']} | "
                   f"{lo:.2f}-{hi:.2f} |")
    lo, hi = r["mean_ci95"]
    lines.append(f"| **{variant}** | **mean** | **{r['mean_success']:.3f}** | {r['episodes']} | "
                 f"{lo:.2f}-{hi:.2f} |")
  return "\n".join(lines) + "\n"


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, policy: Any = None
                 ) -> dict[str, Any]:
  """Closed-loop evaluation of the run's newest checkpoint; writes the report into the workdir.

  Files under `<workdir>/<config.sim.eval.out_subdir>/`: `<suite>_<variant>.json/.png`, rollout
  GIFs, `summary.json` (mean success, intervals, wall-clock) and `summary.md`. `policy`: a
  ready policy callable (tests), default `SimPolicyAdapter.from_workdir(workdir)`.
  Returns the summary dict.
  """
  from m2vla_jax.sim import evaluate_metaworld  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim import policy_adapter  # pylint: disable=g-import-not-at-top
  sim = _check_sim(config)
  out_dir = os.path.join(workdir, sim.eval.out_subdir)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  if policy is None:
    policy = policy_adapter.SimPolicyAdapter.from_workdir(workdir, seed=int(config.seed))
  load_s = time.time() - t0
  episodes = {"seen": int(sim.eval.episodes_per_task),
              "paraphrased": int(sim.eval.paraphrased_episodes),
              "held_out_tasks": int(sim.eval.held_out_episodes)}
  variants = [v for v in sim.eval.variants if episodes.get(v, 1) > 0]
  timings = {}
  results = {}
  for variant in variants:
    t = time.time()
    results.update(evaluate_metaworld.evaluate_variants(
        policy, sim.suite, eval_config(sim), out_dir, variants=[variant], tasks=tuple(sim.tasks),
        held_out_tasks=tuple(sim.held_out_tasks), episodes_per_variant=episodes))
    timings[variant] = time.time() - t
  summary = {
      "workdir": workdir,
      "dataset": sim.dataset_name,
      "tasks": list(sim.tasks),
      "held_out_tasks": list(sim.held_out_tasks),
      "variants": {v: {"mean_success": r["mean_success"], "mean_ci95": r["mean_ci95"],
                       "episodes": r["episodes"],
                       "per_task": {t: {k: x[k] for k in ("successes", "episodes", "success_rate")}
                                    for t, x in r["per_task"].items()}}
                   for v, r in results.items()},
      "wall_s": {"load_policy": load_s, **{f"eval_{v}": s for v, s in timings.items()}},
  }
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary_markdown(results))
  for v, r in summary["variants"].items():
    lo, hi = r["mean_ci95"]
    print(f"{sim.suite} {v}: mean success {r['mean_success']:.3f} (95% CI {lo:.2f}-{hi:.2f}, "
          f"{r['episodes']} episodes, {timings[v]:.0f}s)", flush=True)
  return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """prepare_data -> trainer.train -> evaluate_run, with wall-clock per phase in the summary."""
  from m2vla_jax.sim import phases  # pylint: disable=g-import-not-at-top
  return phases.run_phases(
      config, workdir, prepare=[("prepare_data", lambda: prepare_data(config))],
      evaluate=lambda: evaluate_run(config, workdir),
      summary_path=os.path.join(workdir, config.sim.eval.out_subdir, "summary.json"))
