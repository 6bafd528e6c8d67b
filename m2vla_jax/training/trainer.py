"""The training loop: config -> mesh, policy, data, sharded state, checkpoints, metrics, profiler.

Owns `build_policy`, `build_data`, `setup` and `train(config, workdir, evaluators)` (periodic evaluations
during training: `Evaluator`, given a `Snapshot`); config checks are
`training/validation.py`, pretrained weights `training/pretrained.py`, FLOP accounting `training/perf.py`. The policy and the data
are named in the config (`config.policy`, `config.data.kind`: a short name from `policies/registry.py`
and `data/sources.py`, or a 'module:attribute' import string), so the trainer never special-cases a model. Failure behaviour:
  * SIGTERM (TPU preemption): the step in flight finishes, a checkpoint is written, `train` returns.
  * a non-finite loss or gradient norm raises `NonFiniteLossError` naming the step; the state built on it
    is never saved, so the newest checkpoint on disk is the last good one.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging as std_logging
import signal
import time
from typing import Any, Iterator, Mapping

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from m2vla_jax.core import dtypes as dtypes_lib
from m2vla_jax.core import freezing
from m2vla_jax.core import tree_util
from m2vla_jax.data import sources
from m2vla_jax.policies import registry as policy_registry
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import config_base
from m2vla_jax.training import feature_cache
from m2vla_jax.training import metrics_writer
from m2vla_jax.training import optimizer as optimizer_lib
from m2vla_jax.training import perf
from m2vla_jax.training import pretrained
from m2vla_jax.training import sharding as sharding_lib
from m2vla_jax.training import train_state as ts_lib
from m2vla_jax.training import validation

# What the run is made of goes through the package logger, which the entry point keeps at INFO (absl's
# root verbosity stays at WARNING for orbax's per-file messages).
_log = std_logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """What an evaluator gets of the run at a step: enough to act (`inference.InferencePolicy(config,
  params, policy_state, statistics, policy=policy)`), nothing to train with."""
  step: int
  config: ml_collections.ConfigDict
  policy: Any
  params: Any                    # trainable and frozen merged, on this host
  policy_state: Any
  statistics: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """A periodic evaluation during training (closed loop in a simulator, offline metrics, ...).

  `run(snapshot) -> {name: scalar}` every `every` steps (and at the last step); the scalars go to the
  run's metrics under `<name>/`. Single-process runs only: a multi-host run logs that it skips them.
  """
  name: str
  every: int
  run: Any


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient norm; the message names the step."""


# A config field is missing, ill-typed or out of range; the message names the field. Defined beside the
# short-argument parser (config files raise it too) and re-exported here for the trainer's callers.
ConfigError = config_base.ConfigError


def build_policy(config: ml_collections.ConfigDict, mesh: Any = None) -> Any:
  """The policy object; `mesh` is passed to policies whose constructor takes one (sharded MSM retrieval)."""
  cls = validation.resolve(config.policy, policy_registry.POLICIES, "config.policy")
  try:
    takes_mesh = "mesh" in inspect.signature(cls).parameters
  except (TypeError, ValueError):
    takes_mesh = False
  return cls(config.model, mesh=mesh) if takes_mesh else cls(config.model)


def build_data(config: ml_collections.ConfigDict, split: str) -> Iterator:
  """Per-host iterator of numpy batches (batch_size / num_hosts rows) with get_state / set_state.

  A factory gets this host's index and count and returns its rows of the global batch; the global
  batch does not depend on how many hosts share it.
  """
  factory = validation.resolve(config.data.kind, sources.SOURCES, "config.data.kind")
  return factory(config, split=split, batch_size=config.batch_size // jax.process_count(),
                 seed=config.seed, process_index=jax.process_index(),
                 process_count=jax.process_count())


def _shardings(abstract: ts_lib.TrainState, mesh, config) -> ts_lib.TrainState:
  rules = [tuple(r) for r in config.sharding.param_rules]
  paths = set(abstract.trainable) | set(abstract.frozen)
  kw = dict(mesh=mesh, rules=rules, min_bytes=config.sharding.fsdp_min_bytes, param_paths=paths)
  rep = sharding_lib.replicated(mesh)
  return ts_lib.TrainState(
      step=rep, rng=rep,
      trainable=sharding_lib.param_shardings(abstract.trainable, **kw),
      frozen=sharding_lib.param_shardings(abstract.frozen, **kw),
      opt_state=sharding_lib.param_shardings(abstract.opt_state, **kw),
      ema=None if abstract.ema is None else sharding_lib.param_shardings(abstract.ema, **kw),
      policy_state=sharding_lib.state_shardings(abstract.policy_state, mesh))


def batch_spec(batch: Any) -> dict:
  """{path: {'shape', 'dtype'}} of a batch, stored with checkpoints so export needs no data pipeline."""
  return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
          for k, v in tree_util.flatten(batch).items()}


def example_from_spec(spec: Mapping[str, Any], batch_size: int = 1) -> dict:
  """Zeros shaped like a stored batch spec (leading dim replaced by batch_size); masks all True."""
  flat = {}
  for k, v in spec.items():
    shape = [batch_size] + list(v["shape"][1:])
    flat[k] = np.ones(shape, v["dtype"]) if v["dtype"] == "bool" else np.zeros(shape, v["dtype"])
  return tree_util.unflatten(flat)


def _config_json(config) -> dict:
  return ckpt_lib._to_json(config.to_dict())  # pylint: disable=protected-access


@dataclasses.dataclass
class Setup:
  """Everything built from a config before the first step (also used by export and evaluation)."""
  mesh: Any
  policy: Any
  tx: Any
  schedule: Any
  state: ts_lib.TrainState
  shardings: ts_lib.TrainState
  abstract: ts_lib.TrainState
  example_batch: Any


def setup(config: ml_collections.ConfigDict, example_batch: Any, devices: Any = None) -> Setup:
  """Mesh (over `devices`, default all), policy, optimizer and a freshly initialised, sharded TrainState."""
  mesh = sharding_lib.make_mesh(config.mesh.to_dict(), devices)
  policy = build_policy(config, mesh)
  tx, schedule = optimizer_lib.make_optimizer(config)
  example = jax.tree_util.tree_map(lambda x: np.asarray(x)[:1], example_batch)
  init_fn = ts_lib.make_init_fn(policy, tx, example, policy.trainable_rules,
                                dtypes_lib.DTYPES[policy.frozen_dtype], config.ema_decay > 0)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init_fn, rng)
  for i, (name, regex, _) in enumerate(optimizer_lib.groups(config)):
    if not any(optimizer_lib.group_of(k, [(name, regex, 0.0)]) == name for k in abstract.trainable):
      raise ConfigError(f"config.optimizer.groups[{i}]: {name!r} regex {regex!r} matches no trainable "
                        f"parameter (trainable paths start with "
                        f"{sorted({k.rsplit('/', 2)[0] for k in abstract.trainable})[:6]}); fix the regex "
                        "or config.model.trainable")
  shardings = _shardings(abstract, mesh, config)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  if "init" in config and any(config.init.get(k) for k in pretrained.INIT_SOURCES):
    # Pretrained weights are merged outside jit, so a multi-GB backbone is never a compile-time constant.
    state = pretrained.merge_into_state(state, shardings,
                                       pretrained.load_init_checkpoint(config, abstract.params()))
  if hasattr(policy, "prepare"):
    # Parts derived from the backbone's final weights (an EMA teacher, spectrally initialised
    # adapters) are computed from them, the same way on every start (frozen weights are rebuilt, not
    # restored, so a resumed or exported run recomputes exactly what its first start did).
    before = tree_util.flatten(state.params())
    params, policy_state = policy.prepare(state.params(), state.policy_state)
    # Only what prepare replaced moves (a multi-GB backbone it leaves alone is not copied).
    changed = {k: v for k, v in tree_util.flatten(params).items() if v is not before.get(k)}
    if changed:
      state = pretrained.merge_into_state(state, shardings, changed)
    if policy_state is not state.policy_state:
      state = state.replace(policy_state=jax.device_put(policy_state, shardings.policy_state))
  return Setup(mesh, policy, tx, schedule, state, shardings, abstract, example)


def abstract_for_restore(s: Setup) -> ts_lib.TrainState:
  """Restore target: ShapeDtypeStructs with shardings; the real frozen arrays are passed through."""
  tree = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                s.abstract, s.shardings)
  return tree.replace(frozen=s.state.frozen)


class _Stop:
  """SIGTERM flag; the handler only records the request, the loop acts at a step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() > 1:
      # jax.distributed's preemption notifier owns SIGTERM: it tells every process, and the loop
      # asks it (checkpointer.reached_preemption) so all hosts stop at the same step. A Python
      # handler here would replace it, and the signalled host would leave the others hanging in
      # the next collective.
      return self
    def handler(signum, frame):
      del frame
      logging.warning("Received signal %d: finishing the current step, saving, exiting.", signum)
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # Not the main thread (e.g. a notebook worker): preemption is not handled.
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _is_finite_metrics(m: Mapping[str, Any]) -> bool:
  return bool(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))


def train(config: ml_collections.ConfigDict, workdir: str, evaluators: tuple[Evaluator, ...] = ()) -> dict:
  """Trains until config.total_steps (resuming from workdir's newest good checkpoint); returns last metrics.

  `evaluators` run during training (see `Evaluator`); their scalars are also returned, by step.
  Returns {'step': last step, 'loss': ..., 'preempted': bool, 'history': [(step, loss), ...],
  'evaluations': [(step, {name/key: value}), ...]}.
  """
  for ev in evaluators:
    if not isinstance(ev, Evaluator) or ev.every < 1:
      raise ConfigError(f"evaluator {ev!r}: pass trainer.Evaluator(name, every >= 1, run)")
  validation.validate_config(config)
  jax.config.update("jax_threefry_partitionable", True)
  workdir_path = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir_path.mkdir(parents=True, exist_ok=True)
    ckpt_lib.dump_json(workdir_path / "config.json", _config_json(config))

  train_data = build_data(config, "train")
  initial_data_state = train_data.get_state()
  example = next(train_data)
  train_data.set_state(initial_data_state)

  s = setup(config, example)
  mesh = s.mesh
  checkpointer = ckpt_lib.Checkpointer(str(workdir_path / "checkpoints"), keep=config.checkpoint.keep,
                                       keep_every=config.checkpoint.keep_every,
                                       async_save=config.checkpoint.async_save,
                                       use_ocdbt=config.checkpoint.get("use_ocdbt", True))
  state = s.state
  if is_main:
    _log.info("Parameters by optimizer group (policy %s):\n%s", config.policy,
                 optimizer_lib.describe_groups(s.abstract.trainable, s.abstract.frozen,
                                               s.abstract.opt_state, config))
  restored = checkpointer.restore_latest(abstract_for_restore(s))
  if restored is not None:
    state, data_state, _ = restored
    train_data.set_state(data_state)
    logging.info("Resumed from step %d", int(state.step))
  start_step = int(jax.device_get(state.step))
  stats = train_data.statistics() if hasattr(train_data, "statistics") else {}
  # The spec export and inference see: raw observations, never cached features.
  assets = {"config": _config_json(config), "statistics": stats, "batch_spec": batch_spec(example),
                        # Multi-host: frozen shards are not all addressable here; the check is skipped.
            "frozen_fingerprint": freezing.fingerprint(state.frozen) if jax.process_count() == 1 else {}}
  if config.feature_cache.stage != "off" and jax.process_count() > 1:
    logging.warning("frozen-feature cache off: not supported with %d processes yet", jax.process_count())
  elif config.feature_cache.stage != "off":
    train_data = feature_cache.attach(config, s.policy, state.params(), train_data)
    if isinstance(train_data, feature_cache.WithFrozenFeatures):
      example = train_data.attach(example)

  train_step = ts_lib.make_train_step(s.policy, s.tx, s.schedule, config.grad_accum_steps, config.ema_decay)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  step_jit = jax.jit(train_step, in_shardings=(s.shardings, batch_sharding), out_shardings=(s.shardings, rep),
                     donate_argnums=0)
  eval_jit = jax.jit(ts_lib.make_eval_step(s.policy), in_shardings=(s.shardings, batch_sharding),
                     out_shardings=rep)

  writer = metrics_writer.MetricsWriter(str(workdir_path / "tensorboard"), enabled=is_main)
  total = config.total_steps
  result = {"step": start_step, "loss": None, "preempted": False, "history": [], "evaluations": []}
  if evaluators and jax.process_count() > 1:
    logging.warning("%d evaluators skipped: they run in single-process training only", len(evaluators))
    evaluators = ()
  if start_step >= total:
    logging.info("Nothing to do: checkpoint step %d >= total_steps %d", start_step, total)
    checkpointer.close()
    return result

  global_batch = sharding_lib.host_to_global(example, mesh)
  t0 = time.time()
  compiled = step_jit.lower(state, global_batch).compile()
  logging.info("Compiled the train step in %.1fs", time.time() - t0)
  flops = perf.step_flops(compiled)
  peak = perf.peak_flops_per_device(config)
  examples_per_step = config.batch_size

  progress = None
  if is_main:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=total, initial=start_step, desc="train", dynamic_ncols=True,
                         disable=not config.get("progress_bar", True))

  pending: list[tuple[int, Any]] = []
  last_good_ckpt = max(checkpointer.all_steps(), default=None)
  window_start = (time.time(), start_step)  # (time, step) of the last rate measurement
  profiling = False

  def flush(keep_last: int):
    """Fetches metrics of all but the newest `keep_last` dispatched steps; raises on non-finite values."""
    nonlocal window_start
    while len(pending) > keep_last:
      step, m = pending.pop(0)
      m = jax.device_get(m)
      if not _is_finite_metrics(m):
        checkpointer.wait()
        raise NonFiniteLossError(
            f"non-finite training loss at step {step} (loss={float(m['loss'])}, grad_norm="
            f"{float(m['grad_norm'])}); stopping without saving. Last good checkpoint: "
            f"{max(checkpointer.all_steps(), default=None)} in {workdir_path / 'checkpoints'}")
      result["history"].append((step, float(m["loss"])))
      result["loss"], result["step"] = float(m["loss"]), step
      if progress is not None:
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{float(m['loss']):.4f}", refresh=False)
      if step % config.log_every == 0 or step == total:
        # Rate over the steps since the last log; metrics lag dispatch by at most one step.
        now = time.time()
        steps_per_s = (step - window_start[1]) / max(now - window_start[0], 1e-9)
        scalars = {f"train/{k}": v for k, v in m.items()}
        scalars["perf/steps_per_s"] = steps_per_s
        scalars["perf/examples_per_s"] = steps_per_s * examples_per_step
        if flops is not None:
          scalars["perf/step_gflops_per_device"] = flops / 1e9
          if peak:
            scalars["perf/mfu"] = flops * steps_per_s / peak
        writer.write(step, scalars)
        window_start = (now, step)

  with _Stop() as stop, mesh:
    try:
      for step in range(start_step + 1, total + 1):
        if config.profile_steps and step == config.profile_steps[0] and is_main:
          jax.profiler.start_trace(str(workdir_path / "profile"))
          profiling = True
        try:
          batch = next(train_data)
        except StopIteration:
          logging.warning("Training data ran out at step %d", step)
          break
        state, metrics = compiled(state, sharding_lib.host_to_global(batch, mesh))
        pending.append((step, metrics))
        if profiling and step == config.profile_steps[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
        preempt = stop.requested or (jax.process_count() > 1 and checkpointer.reached_preemption(step))
        save_due = step % config.checkpoint.every == 0 or step == total or preempt
        eval_due = config.eval_every and step % config.eval_every == 0
        due = [ev for ev in evaluators if step % ev.every == 0 or step == total]
        flush(keep_last=0 if (save_due or eval_due or due or step == total) else 1)
        if eval_due:
          writer.write(step, _evaluate(config, eval_jit, state, mesh))
        if due:
          snapshot = Snapshot(step, config, s.policy, jax.device_get(state.params()),
                              jax.device_get(state.policy_state), stats)
          scalars = {}
          for ev in due:
            t0 = time.time()
            scalars.update({f"{ev.name}/{k}": float(v) for k, v in ev.run(snapshot).items()})
            scalars[f"{ev.name}/seconds"] = time.time() - t0
          writer.write(step, scalars)
          result["evaluations"].append((step, scalars))
        if save_due:
          checkpointer.save(state, train_data.get_state(), assets)
          last_good_ckpt = step
        if preempt:
          logging.warning("Preempted: saved step %d, exiting.", step)
          result["preempted"] = True
          break
      flush(keep_last=0)
    finally:
      if profiling:
        jax.profiler.stop_trace()
      if progress is not None:
        progress.close()
      writer.close()
      checkpointer.close()
  result["last_checkpoint"] = last_good_ckpt
  return result


def _evaluate(config, eval_jit, state, mesh) -> dict:
  """Mean held-out loss over the first config.eval_steps validation batches (the same ones every time)."""
  data = build_data(config, "val")
  sums: dict[str, float] = {}
  n = 0
  local_batch = config.batch_size // jax.process_count()
  for _ in range(config.eval_steps):
    try:
      batch = next(data)
    except StopIteration:
      break
    if batch["frame_id"].shape[0] != local_batch:  # a last partial batch would not shard evenly
      break
    m = jax.device_get(eval_jit(state, sharding_lib.host_to_global(batch, mesh)))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    n += 1
  return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}
