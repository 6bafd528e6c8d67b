"""Device mesh, sharding rules and host->global batch assembly.

Owns: the `('data', 'fsdp', 'model')` mesh built from `config.mesh`, the rules that map parameter paths to
`PartitionSpec`s (regex rules first, then a default FSDP rule that shards the largest divisible axis of big
arrays over 'fsdp', as openpi and big_vision do), the sharding of policy state (the MSM memory is sharded
along its entry axis over the data-parallel axes), and the conversion of per-host numpy batches into
global `jax.Array`s. Shardings are derived from `jax.eval_shape` trees, so nothing is materialised twice.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2vla_jax.core import tree_util

AXES = ("data", "fsdp", "model")
# The batch (and the MSM entry axis) is split over every data-parallel axis: FSDP shards hold distinct
# examples too, so an FSDP step still sees the whole global batch.
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(flag: str = "auto") -> None:
  """`jax.distributed.initialize()` on multi-host jobs.

  flag: 'auto' initialises when the environment names a multi-host job (TPU pod slice with more than one
  worker, or the coordinator variables jax reads), 'yes' always, 'no' never.
  """
  if flag not in ("auto", "yes", "no"):
    raise ValueError(f"--distributed must be auto, yes or no, got {flag!r}")
  if flag == "no":
    return
  multi_host_env = (
      len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
      or "JAX_COORDINATOR_ADDRESS" in os.environ
      or "COORDINATOR_ADDRESS" in os.environ
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if flag == "yes" or multi_host_env:
    logging.info("Initialising jax.distributed (flag=%s, multi-host env=%s)", flag, multi_host_env)
    jax.distributed.initialize(**_explicit_process_env())


def _explicit_process_env() -> dict[str, int]:
  """num_processes / process_id from JAX_NUM_PROCESSES / JAX_PROCESS_ID, when both are set.

  jax reads only the coordinator address from the environment and detects the rest on TPU, SLURM,
  MPI and Kubernetes. Elsewhere (several processes on one machine, a bare VM fleet) these two
  variables beside JAX_COORDINATOR_ADDRESS name the job; on CPU the collectives go over gloo.
  """
  names = ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  values = {n: os.environ.get(n) for n in names}
  if not any(values.values()):
    return {}
  if not all(values.values()):
    raise ValueError(f"set both {names[0]} and {names[1]} (got {values}), or neither.")
  try:
    count, index = int(values[names[0]]), int(values[names[1]])
  except ValueError:
    raise ValueError(f"{names[0]} and {names[1]} must be integers, got {values}.") from None
  if not 0 <= index < count:
    raise ValueError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}).")
  return {"num_processes": count, "process_id": index}


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'model'); one size may be -1 (all remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(mesh_config) - set(AXES)
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; allowed axes are {AXES}")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {free}")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise ValueError(f"config.mesh: {len(devices)} devices are not divisible by the fixed axes {sizes}")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"config.mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}; "
                     "set one axis to -1")
  shape = tuple(sizes[a] for a in AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # Emulated CPU devices have no physical topology to optimise for.
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, AXES)


def _spec_from_rule(value: Any) -> P:
  if isinstance(value, P):
    return value
  if value is None:
    return P()
  return P(*[tuple(v) if isinstance(v, list) else v for v in value])


def fsdp_spec(shape: Sequence[int], itemsize: int, mesh: Mesh, min_bytes: int) -> P:
  """Shard the largest axis divisible by the 'fsdp' size; replicate small arrays (openpi's rule)."""
  n = mesh.shape["fsdp"]
  if n == 1 or math.prod(shape) * itemsize < min_bytes:
    return P()
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % n == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def _check_spec(path: str, spec: P, shape: Sequence[int], mesh: Mesh) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"sharding rule gives {spec} for {path!r} of rank {len(shape)}")
  for dim, axes in zip(shape, spec):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if dim % size:
      raise ValueError(f"sharding rule gives {spec} for {path!r} of shape {tuple(shape)}: dimension {dim} "
                       f"is not divisible by {size}; change config.sharding.param_rules or config.mesh")


def param_shardings(abstract: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                    min_bytes: int = 4 * 2**20, param_paths: set[str] | None = None) -> Any:
  """NamedShardings for a tree of ShapeDtypeStructs.

  rules: `[(regex, spec), ...]`, the first regex that fully matches a parameter path wins; spec is a
    tuple of mesh axis names / None / tuples of names (a PartitionSpec). Unmatched arrays get the FSDP rule.
  param_paths: the flat parameter paths; a leaf whose tree path contains one of them as a dict key (the
    optimizer's `mu`/`nu` of a flat parameter dict) is matched under that parameter's path, so optimizer
    state is sharded exactly like its parameter.
  """
  compiled = [(re.compile(p), _spec_from_rule(s)) for p, s in rules]

  def decide(path, leaf):
    name = tree_util.path_str(path)
    if param_paths:
      for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and str(key.key) in param_paths:
          name = str(key.key)
          break
    shape = getattr(leaf, "shape", ())
    for pattern, spec in compiled:
      if pattern.fullmatch(name):
        _check_spec(name, spec, shape, mesh)
        return NamedSharding(mesh, spec)
    itemsize = np.dtype(getattr(leaf, "dtype", np.float32)).itemsize
    return NamedSharding(mesh, fsdp_spec(shape, itemsize, mesh, min_bytes))

  return jax.tree_util.tree_map_with_path(decide, abstract)


def batch_axes_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def state_shardings(abstract: Any, mesh: Mesh) -> Any:
  """Policy state (MSM memory): the leading (entry) axis over the batch axes when divisible.

  Scalars and arrays whose leading axis does not divide (a write pointer, a counter) are replicated.
  """
  n = batch_axes_size(mesh)

  def decide(leaf):
    shape = getattr(leaf, "shape", ())
    if len(shape) >= 1 and shape[0] % n == 0 and shape[0] >= n:
      return NamedSharding(mesh, P(BATCH_AXES))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(decide, abstract)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Per-host numpy batch [B_local, ...] -> global jax.Arrays [B_local * num_processes, ...]."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                                batch)
