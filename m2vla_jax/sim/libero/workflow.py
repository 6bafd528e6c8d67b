"""LIBERO on a CPU: scripted demonstrations -> training -> closed loop on held-out init states.

Owns the glue a training config with a `config.libero` section (configs/libero_cpu.py) needs around
the trainer, as `m2vla_jax.sim.metaworld.workflow` does for Meta-World:

    prepare_data(config)                   # record + write the expert demos unless cached (demos.py);
                                           # registers them under their cache name
    trainer.train(config, workdir)
    evaluate_run(config, workdir)          # newest checkpoint, init states demos_per_task.. of the
                                           # same tasks -> <workdir>/<config.libero.eval.out_subdir>/

`run(config, workdir)` does the three with wall-clock per phase; `python -m m2vla_jax.train
--config=configs/libero_cpu.py --workdir=DIR` runs it.

`config.libero` fields: suite, tasks (task indices), demos_per_task (init states 0..n-1 demonstrated),
noise_std, image_size, render_size, worker_python ('' = this interpreter), dataset_name (the demo
cache's name, `name_from_config`), and `eval`: episodes_per_task (init states n..n+k-1), batch_size,
execute_steps, num_videos, out_subdir.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import ml_collections

from m2vla_jax.evaluation import summary as summary_lib
from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.libero import demos
from m2vla_jax.sim.libero import env as libero_env


def env_config(section: Mapping[str, Any]) -> libero_env.EnvConfig:
  return libero_env.EnvConfig(suite=section["suite"], image_size=int(section["image_size"]),
                              render_size=int(section["render_size"]),
                              worker_python=section["worker_python"] or None)


def demo_config(section: Mapping[str, Any]) -> demos.DemoConfig:
  return demos.DemoConfig(env=env_config(section), tasks=tuple(int(t) for t in section["tasks"]),
                          demos_per_task=int(section["demos_per_task"]),
                          noise_std=float(section["noise_std"]))


def name_from_config(section: Mapping[str, Any]) -> str:
  """The demo cache's name of a `config.libero` section."""
  return demos.cache_name(demos.generation_spec(demo_config(section)))


def _check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if "libero" not in config:
    raise ValueError("config has no 'libero' section; use configs/libero_cpu.py")
  section = config.libero
  demo_cache.check_name("config.libero.dataset_name", section.dataset_name,
                        name_from_config(section),
                        "set it with sim.libero.workflow.name_from_config(config.libero)")
  if config.data.pipeline.datasets != section.dataset_name:
    raise ValueError(f"config.data.pipeline.datasets={config.data.pipeline.datasets!r} must be "
                     f"config.libero.dataset_name={section.dataset_name!r}")
  return section


def prepare_data(config: ml_collections.ConfigDict) -> str:
  """Records and writes the demonstrations unless cached, and registers them in this process (call
  it in the training process). Returns the dataset directory."""
  section = _check(config)
  data_dir = config.data.pipeline.data_dir
  if not data_dir:
    raise ValueError("config.data.pipeline.data_dir is empty; set the demo cache directory")
  path, stats = demos.generate_and_write(demo_config(section), data_dir, name=section.dataset_name)
  if stats is not None:
    print(demos.stats_markdown(stats), flush=True)
  demos.register(section.dataset_name, section.suite)
  return path


def eval_config(section: Mapping[str, Any]):
  from m2vla_jax.sim.libero import evaluate  # pylint: disable=g-import-not-at-top
  e = section["eval"]
  return evaluate.EvalConfig(env=env_config(section), tasks=tuple(int(t) for t in section["tasks"]),
                             episodes_per_task=int(e["episodes_per_task"]),
                             first_init_state=int(section["demos_per_task"]),
                             batch_size=int(e["batch_size"]), execute_steps=int(e["execute_steps"]),
                             num_videos=int(e["num_videos"]))


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, policy: Any = None
                 ) -> dict[str, Any]:
  """Closed loop of the run's newest checkpoint on the tasks' held-out init states.

  Files under `<workdir>/<config.libero.eval.out_subdir>/`: `<suite>_held_out_inits.json/.png`,
  GIFs, `summary.json` and `summary.md`. `policy`: a ready policy in standardized units (tests);
  default the run's newest checkpoint. Returns the summary dict.
  """
  from m2vla_jax.sim.common import phases  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.common import policy_adapter  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.libero import evaluate  # pylint: disable=g-import-not-at-top
  section = _check(config)
  out_dir, policy, wall = phases.open_evaluation(
      workdir, section.eval.out_subdir, policy=policy,
      load=lambda: policy_adapter.SimPolicyAdapter.from_workdir(workdir, seed=int(config.seed)))
  name = f"{section.suite}_held_out_inits"
  cfg = eval_config(section)
  t0 = time.time()
  result = evaluate.evaluate(evaluate.StandardizedPolicy(policy), cfg, out_dir, name)
  wall["eval"] = time.time() - t0
  results = {"held_out_inits": result}
  summary = summary_lib.run_summary(
      workdir, section.dataset_name, [evaluate.task_name(section.suite, t) for t in cfg.tasks],
      "variant", results, wall, suite=section.suite,
      init_states=[cfg.first_init_state, cfg.first_init_state + cfg.episodes_per_task - 1])
  return phases.write_evaluation(out_dir, summary, summary_lib.markdown(results, "variant"),
                                 [summary_lib.headline(name, result, wall["eval"])])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """prepare_data -> trainer.train -> evaluate_run, with wall-clock per phase in the summary."""
  from m2vla_jax.sim.common import phases  # pylint: disable=g-import-not-at-top
  return phases.run_phases(
      config, workdir, prepare=[("prepare_data", lambda: prepare_data(config))],
      evaluate=lambda: evaluate_run(config, workdir),
      summary_path=os.path.join(workdir, config.libero.eval.out_subdir, "summary.json"))
