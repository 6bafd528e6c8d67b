"""MJX tabletop suite end to end: expert demos -> training -> compiled and C-MuJoCo evaluation.

Owns the glue that a training config with a `config.mjx` section (configs/mjx.py) needs around
the trainer, modelled on `m2vla_jax.sim.workflow` (Meta-World):

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
dataset_name (derived by `configs/mjx.py:dataset_name`), and `eval`: episodes_per_task, horizon, execute_steps, seed, c_mujoco,
demo_layouts (also roll out on the demonstrations' first initial layouts), out_subdir;
`pretrain`: steps, batch_size, lr, seed; `dagger`: rounds, episodes_per_task, beta, beta_decay, seed.

Report files: `mjx_compiled.json/.png`, `c_mujoco.json/.png`, with `demo_layouts`
`mjx_demo_layouts.json/.png` (every episode: instruction,
success, steps, return), `summary.json` and `summary.md` (per-task success with Wilson 95%
intervals, compiled vs C, per-episode agreement, wall-clock per phase, and the experts' success
while recording, kept beside the demos as `mjx_demo_summary.json`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import ml_collections

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
  slots = tuple(s for s, _ in experts.camera_slots(tuple(m.cameras)))
  if tuple(config.data.pipeline.cameras) != slots:
    raise ValueError(f"config.data.pipeline.cameras={tuple(config.data.pipeline.cameras)} must be "
                     f"the slots of config.mjx.cameras={tuple(m.cameras)}: {slots}")
  if int(config.model.num_cameras) != len(slots):
    raise ValueError(f"config.model.num_cameras={config.model.num_cameras} must be "
                     f"len(config.mjx.cameras)={len(slots)}")
  _check_tokenizer(tuple(m.tasks), str(config.data.tokenizer), int(config.data.pipeline.max_tokens))
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
                         f"={spec[:40]!r}, more than config.data.pipeline.max_tokens={max_tokens}; "
                         f"raise max_tokens (and model.vlm_overrides.max_text_tokens)")
      if ids in seen:
        raise ValueError(f"instructions {seen[ids]!r} and {ins.text!r} have the same tokens with "
                         f"config.data.tokenizer={spec[:40]!r}")
      seen[ids] = ins.text


def _check_layout_sharing(tasks: tuple[str, ...], repeats: int) -> None:
  """Episodes that share a layout must name different blocks for the same task.

  Instructions are dealt round-robin over tasks, then over each task's instructions (colour
  fastest), so e.g. 3 repeats over 3 tasks give every layout one colour: the demos can then be
  fitted from the image alone, and the policy learned to ignore the colour word (RESULTS.md).
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
  """The data-registry entry of the demos `prepare_data` writes (`cameras`, state, action).

  The gripper action is declared continuous (like the Meta-World demos): normalization stays
  invertible, so the policy's output maps back to the simulator's action exactly.
  """
  from m2vla_jax.data.oxe import spec as oxe_spec  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  return oxe_spec.DatasetSpec(name, dict(experts.camera_slots(tuple(cameras))),
                              state=(oxe_spec.Field("observation/state"),),
                              action=(oxe_spec.Field("action"),),
                              action_encoding=oxe_spec.ActionEncoding.EEF_DELTA)


def cached_path(data_dir: str, name: str) -> str | None:
  path = os.path.join(data_dir, name, "1.0.0")
  return path if os.path.exists(os.path.join(path, "dataset_info.json")) else None


def prepare_data(config: ml_collections.ConfigDict) -> tuple[str, dict[str, Any] | None]:
  """Records and writes the expert demonstrations unless cached; registers them.

  Returns (dataset directory, expert summary or None when the cache was used). Call it in the
  training process before `trainer.train` (the registry entry lives in this process).
  """
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  m = _check(config)
  data_dir = config.data.pipeline.data_dir
  if not data_dir:
    raise ValueError("config.data.pipeline.data_dir is empty; set the demo cache directory")
  oxe.register(dataset_spec(m.dataset_name, m.cameras), overwrite=True)
  path = cached_path(data_dir, m.dataset_name)
  if path is not None:
    print(f"using cached demonstrations {path}", flush=True)
    return path, None
  t0 = time.time()
  path, summary = experts.collect_demos(
      data_dir, m.dataset_name, tasks=tuple(m.tasks), episodes_per_task=int(m.episodes_per_task),
      horizon=int(m.demo_horizon), seed=int(m.demo_seed), image_size=int(m.image_size),
      cameras=tuple(m.cameras), noise=float(m.demo_noise),
      layout_repeats=int(m.demo_layout_repeats),
      **_post_success(m))
  brief = _brief(summary)
  brief["wall_s"] = time.time() - t0
  with open(os.path.join(path, _DEMO_STATS), "w") as f:
    json.dump(brief, f, indent=1)
  print(f"expert demos: success {brief['mean_success']:.3f} over {brief['episodes']} episodes "
        f"({brief['wall_s']:.0f}s) -> {path}", flush=True)
  return path, brief


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


def _brief(summary: Mapping[str, Any]) -> dict[str, Any]:
  return {"mean_success": summary["mean_success"], "mean_ci95": list(summary["mean_ci95"]),
          "episodes": summary["episodes"],
          "per_task": {t: {k: x[k] for k in ("successes", "episodes", "success_rate", "ci95")}
                       for t, x in summary["per_task"].items()}}


def summary_markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
  """One table: rollout x task success (successes/episodes), the mean with its 95% interval, and
  how often the hand went closest to the named block (recorded rollouts; chance is 1/3)."""
  lines = ["| rollout | task | success | episodes | 95% CI | named block closest |",
           "|---|---|---|---|---|---|"]

  def closest(entry):
    v = entry.get("named_block_closest")
    return "-" if v is None else f"{v:.2f}"

  for name, r in results.items():
    for task, t in r["per_task"].items():
      lo, hi = t["ci95"]
      lines.append(f"| {name} | {task} | {t['successes']}/{t['episodes']} "
                   f"({t['success_rate']:.2f}) | {t['episodes']} | {lo:.2f}-{hi:.2f} | "
                   f"{closest(t)} |")
    lo, hi = r["mean_ci95"]
    lines.append(f"| **{name}** | **mean** | **{r['mean_success']:.3f}** | {r['episodes']} | "
                 f"{lo:.2f}-{hi:.2f} | {closest(r)} |")
  return "\n".join(lines) + "\n"


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
  out_dir = os.path.join(workdir, e.out_subdir)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  if trained is None:
    trained = policy_lib.TrainedPolicy.from_workdir(workdir)
  wall = {"load_policy": time.time() - t0}
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

  summary = {
      "workdir": workdir,
      "dataset": m.dataset_name,
      "tasks": list(m.tasks),
      "episodes": n,
      "horizon": horizon,
      "execute_steps": int(e.execute_steps),
      "cameras": list(m.cameras),
      "image_size": int(m.image_size),
      "seed": int(e.seed),
      "rollouts": {k: {"mean_success": r["mean_success"], "mean_ci95": list(r["mean_ci95"]),
                       "episodes": r["episodes"],
                       "named_block_closest": r.get("named_block_closest"),
                       "per_task": {t: {f: x[f] for f in ("successes", "episodes",
                                                          "success_rate", "ci95")}
                                    for t, x in r["per_task"].items()}}
                   for k, r in results.items()},
      "wall_s": wall,
  }
  if "c" in raw:
    agree = c_rollout.compare(raw["compiled"], raw["c"])
    lo, hi = results["compiled MJX"]["mean_ci95"]
    c_mean = results["C MuJoCo"]["mean_success"]
    agree["c_within_compiled_ci95"] = bool(lo - 1e-9 <= c_mean <= hi + 1e-9)   # float Wilson ends
    summary["agreement"] = agree
  demo_stats = os.path.join(config.data.pipeline.data_dir, m.dataset_name, "1.0.0", _DEMO_STATS)
  if os.path.exists(demo_stats):
    with open(demo_stats) as f:
      summary["expert_demos"] = json.load(f)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(summary_markdown(results))
    if "agreement" in summary:
      a = summary["agreement"]
      f.write(f"\nSame outcome in {a['same_outcome']}/{a['episodes']} episodes (compiled only "
              f"{a['compiled_only']}, C only {a['c_only']}); C mean within the compiled 95% CI: "
              f"{a['c_within_compiled_ci95']}.\n")
  for k, r in results.items():
    lo, hi = r["mean_ci95"]
    print(f"{k}: mean success {r['mean_success']:.3f} (95% CI {lo:.2f}-{hi:.2f}, "
          f"{r['episodes']} episodes)", flush=True)
  return summary


def dagger_rounds(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """`config.mjx.dagger.rounds` rounds of DAgger after the behaviour-cloning run in `workdir`.

  Round k rolls out the policy of round k-1 (round 0: `workdir`) mixed with the expert (beta
  `dagger.beta * dagger.beta_decay ** (k - 1)`: the learner takes over as it improves), writes
  the expert-labelled episodes as dataset `<demos>_dagger<k>_<digest of workdir>` next to the
  demonstrations, trains a fresh policy on demonstrations + rounds 1..k (the demonstrations'
  statistics for all, steps as weights) in `workdir/dagger<k>` and evaluates it there. Returns
  one summary per round.
  """
  import copy  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  from m2vla_jax.data import writer  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import dagger  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import experts  # pylint: disable=g-import-not-at-top
  from m2vla_jax.sim.mjx import policy as policy_lib  # pylint: disable=g-import-not-at-top
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  m = _check(config)
  d = m.dagger
  data_dir = config.data.pipeline.data_dir
  # Rollouts of this run's own policies: the datasets carry the run directory's digest.
  tag = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:8]
  # The rounds train on the demonstrations too: registered here as well, so rounds can be run on
  # a finished run directory without `prepare_data` in the same process.
  oxe.register(dataset_spec(m.dataset_name, m.cameras), overwrite=True)
  summaries, names, prev = [], [], workdir
  for k in range(1, int(d.rounds) + 1):
    t0 = time.time()
    name = dagger.round_name(m.dataset_name, k) + f"_{tag}"
    oxe.register(dataset_spec(name, m.cameras), overwrite=True)
    beta = float(d.beta) * float(d.get("beta_decay", 1.0)) ** (k - 1)
    if cached_path(data_dir, name) is None:
      trained = policy_lib.TrainedPolicy.from_workdir(prev)
      env = dataclasses.replace(trained.env_params(tuple(m.tasks), tuple(m.cameras), 1),
                                record=True)
      episodes, rollout_summary = dagger.collect(
          trained.policy_fn, trained.params, env,
          jax.random.key(int(d.seed) + k), int(d.episodes_per_task) * len(m.tasks),
          int(m.demo_horizon), beta,
          image_keys=tuple(key for _, key in experts.camera_slots(tuple(m.cameras))),
          **_post_success(m))
      writer.write_rlds_dataset(episodes, data_dir, name, progress=False, image_encoding="png",
                                description=f"{name}: DAgger round {k} of {prev} (expert labels).")
      print(f"DAgger round {k} (beta {beta:.3f}): {len(episodes)} episodes, mixed-policy success "
            f"{rollout_summary['mean_success']:.3f} -> {name}", flush=True)
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
  from m2vla_jax.sim import phases  # pylint: disable=g-import-not-at-top
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
