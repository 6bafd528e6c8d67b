"""MJX tabletop suite end to end: expert demos -> training -> compiled and C-MuJoCo evaluation.

Owns the glue that a training config with a `config.mjx` section (configs/mjx.py) needs around
the trainer, modelled on `m2vla_jax.sim.metaworld.workflow` (Meta-World):

    path = prepare_data(config)        # expert rollouts in the compiled MJX program -> RLDS (PNG)
                                       # unless cached; registers the dataset for the pipeline
    prepare_backbone(config)           # grounding pretraining (mjx.pretrain.steps > 0), cached
    trainer.train(config, workdir)
    summary = evaluate_run(config, workdir)   # newest checkpoint -> compiled rollout (rollout.
                                       # rollout) and the same episodes through C MuJoCo
                                       # (c_rollout.c_rollout) -> files in <workdir>/<out_subdir>/
    dagger_rounds(config, workdir)     # mjx.dagger.rounds > 0: learner rollouts labelled by the
                                       # expert, retrain on the aggregate, evaluate per round

`run(config, workdir)` does them in sequence and records wall-clock per phase; the entry point
`python -m m2vla_jax.train --config=configs/mjx.py --workdir=DIR` runs it.

`config.mjx` fields (configs/mjx.py): tasks, episodes_per_task, image_size, cameras (rendered
cameras; the first is the 'primary' slot, 'wrist' the 'wrist' slot), demo_horizon,
demo_seed, demo_noise, demo_layout_repeats, demo_post_success_steps, demo_post_success_tasks,
dataset_name (derived by `configs/mjx.py:dataset_name`: the demo cache's name of these settings,
`experts.demo_name`), and `eval`: episodes_per_task, horizon, execute_steps, seed, c_mujoco,
demo_layouts (also roll out on the demonstrations' first initial layouts), out_subdir;
`pretrain`: steps, batch_size, lr, seed; `dagger`: rounds, episodes_per_task, beta, beta_decay, seed.

Report files: `mjx_compiled.json/.png`, `c_mujoco.json/.png`, with `demo_layouts`
`mjx_demo_layouts.json/.png` (every episode: instruction,
success, steps, return), `summary.json` and `summary.md` (`m2vla_jax.evaluation.summary` with
group 'rollout': per-task success with Wilson 95% intervals, compiled vs C, per-episode agreement,
wall-clock per phase, and the experts' success while recording, kept beside the demos as
`mjx_demo_summary.json`). Demonstrations and DAgger rounds live in the demo cache
(`m2vla_jax.sim.common.demo_cache`: recorded once per spec, the spec saved beside the data).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

import ml_collections

from m2vla_jax.data import loader
from m2vla_jax.evaluation import summary as summary_lib
from m2vla_jax.sim.common import demo_cache
from m2vla_jax.sim.common import phases

_DEMO_STATS = "mjx_demo_summary.json"


def _check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if "mjx" not in config:
    raise ValueError("config has no 'mjx' section; use configs/mjx.py (or add config.mjx)")
  m = config.mjx
  if not m.tasks:
    raise ValueError("config.mjx.tasks is empty; name some of m2vla_jax.sim.mjx.tasks.TASKS")
  from m2vla_jax.sim.mjx import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  for t in m.tasks:
    tasks_lib.check_task(t)
  names = [x.split(":")[0] for x in str(config.data.pipeline.datasets).split(",")]
  if names[0] != m.dataset_name or any(not n.startswith(m.dataset_name + "_dagger")
                                       for n in names[1:]):
    raise ValueError(f"config.data.pipeline.datasets={config.data.pipeline.datasets!r} must be "
                     f"config.mjx.dataset_name={m.dataset_name!r} (then only its DAgger rounds)")
  if tuple(config.data.pipeline.image_size) != (m.image_size, m.image_size):
    raise ValueError(f"config.data.pipeline.image_size={tuple(config.data.pipeline.image_size)} "
                     f"must be (mjx.image_size, mjx.image_size)=({m.image_size}, {m.image_size})")
  for field in ("episodes_per_task", "demo_horizon"):
    if int(m[field]) < 1:
      raise ValueError(f"config.mjx.{field}={m[field]} must be >= 1")
  _check_layout_sharing(tuple(m.tasks), int(m.demo_layout_repeats))
  extra = sorted(set(m.get("demo_post_success_tasks", ())) - set(m.tasks))
  if extra:
    raise ValueError(f"config.mjx.demo_post_success_tasks names {extra}, not among "
                     f"config.mjx.tasks={tuple(m.tasks)}; drop them or add the tasks")
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  demo_cache.check_name("config.mjx.dataset_name", m.dataset_name,
                        experts.demo_name(experts.demo_spec(**_demo_args(m))),
                        "derive it with configs/mjx.py's dataset_name from the mjx.demo_* fields "
                        "(or set them through the config's short args)")
  slots = tuple(s for s, _ in experts.camera_slots(tuple(m.cameras)))
  if tuple(config.data.pipeline.cameras) != slots:
    raise ValueError(f"config.data.pipeline.cameras={tuple(config.data.pipeline.cameras)} must be "
                     f"the slots of config.mjx.cameras={tuple(m.cameras)}: {slots}")
  if int(config.model.num_cameras) != len(slots):
    raise ValueError(f"config.model.num_cameras={config.model.num_cameras} must be "
                     f"len(config.mjx.cameras)={len(slots)}")
  _check_tokenizer(tuple(m.tasks), str(config.data.tokenizer), int(loader.pipeline_config(config).max_tokens))
  for field in ("episodes_per_task", "horizon", "execute_steps"):
    if int(m.eval[field]) < 1:
      raise ValueError(f"config.mjx.eval.{field}={m.eval[field]} must be >= 1")
  if int(m.eval.execute_steps) > int(config.model.horizon):
    raise ValueError(f"config.mjx.eval.execute_steps={m.eval.execute_steps} exceeds the action "
                     f"chunk config.model.horizon={config.model.horizon}")
  return m


def _post_success(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """How demonstrations (and DAgger rounds, cut the same way) keep steps after a success."""
  return {"post_success_steps": int(m.get("demo_post_success_steps", 0)),
          "post_success_tasks": tuple(m.get("demo_post_success_tasks", m.tasks))}


def _demo_args(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """`experts.collect_demos` / `experts.demo_spec` arguments of the `config.mjx` demonstrations."""
  return dict(tasks=tuple(m.tasks), episodes_per_task=int(m.episodes_per_task),
              horizon=int(m.demo_horizon), seed=int(m.demo_seed), image_size=int(m.image_size),
              cameras=tuple(m.cameras), noise=float(m.demo_noise),
              layout_repeats=int(m.demo_layout_repeats), **_post_success(m))


def _check_tokenizer(tasks: tuple[str, ...], spec: str, max_tokens: int) -> None:
  """Every instruction fits in max_tokens, and no two become the same tokens.

  Truncation is silent in the pipeline: with 16 byte tokens "pick up the red block" and "pick up
  the red block and set it down ..." would be one instruction for two tasks.
  """
  from m2vla_jax.sim.mjx import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.text import tokenizers  # pylint: disable=g-import-not-at-top
  tok = tokenizers.make_tokenizer(spec)
  seen: dict[tuple[int, ...], str] = {}
  for t in tasks:
    for ins in tasks_lib.vocabulary(t):
      ids = tuple(tok.encode(ins.text))
      if len(ids) > max_tokens:
        raise ValueError(f"instruction {ins.text!r} is {len(ids)} tokens with config.data.tokenizer"
                         f"={spec[:40]!r}, more than the policy's text budget max_tokens={max_tokens}; "
                         f"raise config.model.vlm_overrides.max_text_tokens")
      if ids in seen:
        raise ValueError(f"instructions {seen[ids]!r} and {ins.text!r} have the same tokens with "
                         f"config.data.tokenizer={spec[:40]!r}")
      seen[ids] = ins.text


def _check_layout_sharing(tasks: tuple[str, ...], repeats: int) -> None:
  """Episodes that share a layout must name different blocks for the same task.

  Instructions are dealt round-robin over tasks, then over each task's instructions (colour
  fastest), so e.g. 3 repeats over 3 tasks give every layout one colour: the demos can then be
  fitted from the image alone, and the policy learned to ignore the colour word (docs/results/mjx_runs.md).
  """
  from m2vla_jax.sim.mjx import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  if repeats < 1:
    raise ValueError(f"config.mjx.demo_layout_repeats={repeats} must be >= 1")
  if repeats == 1:
    return
  blocks: dict[str, set[int]] = {}
  for e in rollout_lib.EnvParams(tasks=tasks).episodes(repeats):
    blocks.setdefault(e.task, set()).add(e.block)
  one = sorted(t for t, b in blocks.items() if len(b) < 2)
  if one:
    raise ValueError(f"config.mjx.demo_layout_repeats={repeats}: the episodes sharing a layout name "
                     f"one block only for {one} (instructions go round-robin over tasks, then "
                     f"colours), so the colour word is redundant; use 1 or a multiple of "
                     f"len(tasks) * 3 = {len(tasks) * 3}")


def dataset_spec(name: str, cameras: Sequence[str]):
  """The data-registry entry of the demos `prepare_data` writes (`demo_cache.dataset_spec` with
  the slots of `cameras`, `experts.camera_slots`)."""
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  return demo_cache.dataset_spec(name, dict(experts.camera_slots(tuple(cameras))))


def _register(name: str, cameras: Sequence[str]) -> None:
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  demo_cache.register(name, dict(experts.camera_slots(tuple(cameras))))


def prepare_data(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any] | None]:
  """Records and writes the expert demonstrations unless cached; registers them.

  Returns (dataset directory, expert summary or None when the cache was used). Call it in the
  training process before `trainer.train` (the registry entry lives in this process).
  """
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  m = _check(config)
  data_dir = config.data.pipeline.data_dir
  if not data_dir:
    raise ValueError("config.data.pipeline.data_dir is empty; set the demo cache directory")
  _register(m.dataset_name, m.cameras)
  args = _demo_args(m)

  def build():
    t0 = time.time()
    path, summary = experts.collect_demos(data_dir, m.dataset_name, **args)
    brief = summary_lib.brief(summary)
    brief["wall_s"] = time.time() - t0
    with open(os.path.join(path, _DEMO_STATS), "w") as f:
      json.dump(brief, f, indent=1)
    print(f"expert demos: success {brief['mean_success']:.3f} over {brief['episodes']} episodes "
          f"({brief['wall_s']:.0f}s) -> {path}", flush=True)
    return path, brief

  return demo_cache.ensure(data_dir, m.dataset_name, experts.demo_spec(**args), build)


def prepare_backbone(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """Grounding-pretrains the backbone (`config.mjx.pretrain.steps` > 0) unless cached.

  The result is the file `config.init.checkpoint` names (configs/mjx.py derives that name from
  every pretraining setting, so a cached file always matches them). Returns the pretraining
  report, or None when nothing ran.
  """
  m = config.mjx
  if "pretrain" not in m or int(m.pretrain.steps) <= 0:
    return None
  from m2vla_jax.sim.mjx import grounding  # pylint: disable=g-import-not-at-top
  settings = grounding.settings_from_config(config)
  path = config.init.get("checkpoint") if "init" in config else None
  expected = settings.cache_name() + ".npz"
  if not path or os.path.basename(path) != expected:
    raise ValueError(f"config.mjx.pretrain.steps={m.pretrain.steps} but config.init.checkpoint="
                     f"{path!r} is not the file of these settings ({expected!r}); set it with "
                     f"configs/mjx.py's short arg ground=STEPS instead of editing fields")
  t0 = time.time()
  report = grounding.ensure_pretrained(settings, path)
  if report is not None:
    report["wall_s"] = time.time() - t0
    final = report["final"]
    print(f"grounding pretraining: {settings.steps} steps ({report['wall_s']:.0f}s); held-out "
          f"error named block xy {final['named_block_xy']:.2f} cm -> {path}", flush=True)
  return report


def evaluate_run(config: ml_collections.ConfigDict, workdir: str, trained: Any = None
                 ) -> dict[str, Any]:
  """Compiled-MJX and (with mjx.eval.c_mujoco) C-MuJoCo evaluation of the newest checkpoint.

  Both play the same episodes: seed `mjx.eval.seed`, `episodes_per_task * len(tasks)`
  environments dealt round-robin over tasks and instructions. `trained`: a ready
  `policy.TrainedPolicy` (tests); default from the workdir. Returns the summary dict.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import c_rollout  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import rollout as rollout_lib  # pylint: disable=g-import-not-at-top
  m = _check(config)
  e = m.eval
  out_dir, trained, wall = phases.open_evaluation(
      workdir, e.out_subdir, policy=trained, load=lambda: policy_lib.TrainedPolicy.from_workdir(workdir))
  # record=True: the per-call privileged state gives the grounding measure (named_block_closest).
  env = dataclasses.replace(trained.env_params(tuple(m.tasks), tuple(m.cameras),
                                               int(e.execute_steps)),
                            record=True)
  n = int(e.episodes_per_task) * len(m.tasks)
  horizon, rng = int(e.horizon), jax.random.key(int(e.seed))
  results, raw = {}, {}

  t = time.time()
  raw["compiled"] = rollout_lib.rollout(trained.policy_fn, trained.params, env, rng, n, horizon)
  results["compiled MJX"] = rollout_lib.report(raw["compiled"], out_dir, "mjx_compiled")
  wall["eval_compiled"] = time.time() - t
  if e.get("demo_layouts", False):
    # The first n initial layouts of the demonstrations (same seed and layout sharing; reset keys
    # do not depend on the episode count), with the evaluation's instructions: the gap to the
    # fresh layouts above says how much of the policy is memorised layouts.
    t = time.time()
    demo_env = dataclasses.replace(env, layout_repeats=int(m.demo_layout_repeats))
    raw["demo"] = rollout_lib.rollout(trained.policy_fn, trained.params, demo_env,
                                      jax.random.key(int(m.demo_seed)), n, horizon)
    results["compiled MJX, demo layouts"] = rollout_lib.report(raw["demo"], out_dir,
                                                               "mjx_demo_layouts")
    wall["eval_demo_layouts"] = time.time() - t
  if e.c_mujoco:
    t = time.time()
    raw["c"] = c_rollout.c_rollout(trained.policy_fn, trained.params,
                                   dataclasses.replace(env, record=False), rng, n, horizon)
    results["C MuJoCo"] = rollout_lib.report(raw["c"], out_dir, "c_mujoco")
    wall["eval_c_mujoco"] = time.time() - t
    wall["c_mujoco_parts"] = raw["c"]["wall_s"]

  summary = summary_lib.run_summary(
      workdir, m.dataset_name, m.tasks, "rollout", results, wall, extra=("named_block_closest",),
      episodes=n, horizon=horizon, execute_steps=int(e.execute_steps), cameras=list(m.cameras),
      image_size=int(m.image_size), seed=int(e.seed))
  table = summary_lib.markdown(results, "rollout", {"named block closest": "named_block_closest"})
  if "c" in raw:
    agree = c_rollout.compare(raw["compiled"], raw["c"])
    lo, hi = results["compiled MJX"]["mean_ci95"]
    c_mean = results["C MuJoCo"]["mean_success"]
    agree["c_within_compiled_ci95"] = bool(lo - 1e-9 <= c_mean <= hi + 1e-9)   # float Wilson ends
    summary["agreement"] = agree
    table += (f"\nSame outcome in {agree['same_outcome']}/{agree['episodes']} episodes (compiled "
              f"only {agree['compiled_only']}, C only {agree['c_only']}); C mean within the "
              f"compiled 95% CI: {agree['c_within_compiled_ci95']}.\n")
  demo_stats = os.path.join(demo_cache.dataset_dir(config.data.pipeline.data_dir, m.dataset_name),
                            _DEMO_STATS)
  if os.path.exists(demo_stats):
    with open(demo_stats) as f:
      summary["expert_demos"] = json.load(f)
  return phases.write_evaluation(out_dir, summary, table,
                                 [summary_lib.headline(k, r) for k, r in results.items()])


def _collect_round(m: ml_collections.ConfigDict, data_dir: str, name: str,
                   spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
  """Rolls out and writes the DAgger round `spec` (`dagger.round_spec`) as dataset `name`."""
  import jax  # pylint: disable=g-import-not-at-top
  from m2vla_jax.data import writer  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import dagger  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import policy as policy_lib  # pylint: disable=g-import-not-at-top
  trained = policy_lib.TrainedPolicy.from_workdir(spec["learner"])
  env = dataclasses.replace(trained.env_params(tuple(m.tasks), tuple(m.cameras), 1), record=True)
  episodes, rollout_summary = dagger.collect(
      trained.policy_fn, trained.params, env, jax.random.key(spec["seed"]), spec["episodes"],
      spec["horizon"], spec["beta"],
      image_keys=tuple(key for _, key in experts.camera_slots(tuple(spec["cameras"]))),
      post_success_steps=spec["post_success_steps"],
      post_success_tasks=spec["post_success_tasks"])
  path = writer.write_rlds_dataset(
      episodes, data_dir, name, progress=False, image_encoding=spec["image_encoding"],
      description=f"{name}: DAgger round {spec['round']} of {spec['learner']} (expert labels).")
  print(f"DAgger round {spec['round']} (beta {spec['beta']:.3f}): {len(episodes)} episodes, "
        f"mixed-policy success {rollout_summary['mean_success']:.3f} -> {name}", flush=True)
  return path, rollout_summary


def dagger_rounds(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """`config.mjx.dagger.rounds` rounds of DAgger after the behaviour-cloning run in `workdir`.

  Round k rolls out the policy of round k-1 (round 0: `workdir`) mixed with the expert (beta
  `dagger.beta * dagger.beta_decay ** (k - 1)`: the learner takes over as it improves), writes
  the expert-labelled episodes as dataset `<demos>_dagger<k>_<hash of dagger.round_spec>` in the
  demo cache, trains a fresh policy on demonstrations + rounds 1..k (the demonstrations'
  statistics for all, steps as weights) in `workdir/dagger<k>` and evaluates it there. Returns
  one summary per round.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import dagger  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  m = _check(config)
  d = m.dagger
  data_dir = config.data.pipeline.data_dir
  # The rounds train on the demonstrations too: registered here as well, so rounds can be run on
  # a finished run directory without `prepare_data` in the same process.
  _register(m.dataset_name, m.cameras)
  summaries, names, prev = [], [], workdir
  for k in range(1, int(d.rounds) + 1):
    t0 = time.time()
    beta = float(d.beta) * float(d.get("beta_decay", 1.0)) ** (k - 1)
    n_envs, seed = int(d.episodes_per_task) * len(m.tasks), int(d.seed) + k
    spec = dagger.round_spec(m.dataset_name, k, prev, beta, seed, n_envs, int(m.demo_horizon),
                             m.cameras, **_post_success(m))
    name = demo_cache.cache_name(dagger.round_name(m.dataset_name, k), spec)
    _register(name, m.cameras)
    demo_cache.ensure(data_dir, name, spec,
                      functools.partial(_collect_round, m, data_dir, name, spec))
    names.append(name)
    t1 = time.time()
    wd = os.path.join(workdir, f"dagger{k}")
    done = os.path.join(wd, config.mjx.eval.out_subdir, "summary.json")
    if os.path.exists(done):     # this round finished before (the run was restarted)
      with open(done) as f:
        summaries.append(json.load(f))
      prev = wd
      continue
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
      cfg.data.pipeline.datasets = ",".join([m.dataset_name] + names)
      cfg.data.pipeline.shared_statistics = m.dataset_name
      cfg.data.pipeline.balance_by_size = True      # aggregate: every labelled step counts once
    result = trainer.train(cfg, wd)
    t2 = time.time()
    summary = evaluate_run(cfg, wd)
    summary["dagger"] = {"round": k, "datasets": list(names), "beta": beta,
                         "final_loss": result["loss"]}
    summary["wall_s"].update(collect=t1 - t0, train=t2 - t1, evaluate=time.time() - t2)
    with open(os.path.join(wd, cfg.mjx.eval.out_subdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
    summaries.append(summary)
    prev = wd
  return summaries


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """prepare_data -> prepare_backbone -> trainer.train -> evaluate_run (-> dagger_rounds), with
  wall-clock per phase in the summary."""
  _check(config)
  summary = phases.run_phases(
      config, workdir,
      prepare=[("prepare_data", lambda: prepare_data(config)),
               ("pretrain", lambda: prepare_backbone(config))],
      evaluate=lambda: evaluate_run(config, workdir),
      summary_path=os.path.join(workdir, config.mjx.eval.out_subdir, "summary.json"))
  if "dagger" in config.mjx and int(config.mjx.dagger.rounds) > 0:
    summary["dagger_rounds"] = dagger_rounds(config, workdir)
  return summary
