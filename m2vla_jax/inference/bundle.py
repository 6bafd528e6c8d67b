"""Inference bundles: `export(workdir, out)` writes one, `load_policy(path)` reads and checks it.

A bundle (local directory or gs:// prefix) holds everything a robot-side process needs, no optimizer state:
  params.npz       all parameters (trainable from the checkpoint + the frozen backbone), big_vision layout
  state.npz        policy state (the MSM memory, frozen at inference)
  config.json      the training config
  statistics.json  normalization statistics (per dataset), normalization mode, gripper masks
  batch_spec.json  shapes/dtypes of a training batch (to build example inputs)

`load_policy` checks the whole bundle before returning: every file exists and parses, params.npz /
state.npz hold exactly the parameters and state the config's policy initialises (shape and dtype,
against `jax.eval_shape` of its init) and the statistics have the action and state dims of the config.
A bad bundle raises `BundleError` naming the file and the key, at load rather than at the first call.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from typing import Any, Mapping, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from m2vla_jax.core import dtypes
from m2vla_jax.core import freezing
from m2vla_jax.core import tree_util
from m2vla_jax.data import statistics as stats_lib
from m2vla_jax.inference import policy as policy_lib
from m2vla_jax.inference import restore
from m2vla_jax.training import trainer
from m2vla_jax.weights import npz


def export(workdir: str, out: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
           use_ema: bool = False) -> str:
  """Writes a bundle for the run's newest (or given) checkpoint to `out`; returns `out`."""
  config, s, state, assets = restore.restore_run(workdir, step)
  trainable = state.trainable
  if use_ema:
    if state.ema is None:
      raise ValueError("--ema: this run kept no EMA (config.ema_decay == 0)")
    trainable = state.ema
  params = freezing.merge(trainable, state.frozen)
  # LoRA folds into the weights it adapts: the bundle is a plain backbone, as fast as the unadapted
  # one (GSE's routed experts cannot fold and stay as trained).
  config, _, params = policy_lib.fold_lora(config, s.policy, params)
  if dtype:
    cast = dtypes.dtype(dtype, "--dtype")
    params = jax.tree_util.tree_map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                    params)
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  _save_npz(out_path / "params.npz", jax.device_get(params), prefix="params/")
  _save_npz(out_path / "state.npz", jax.device_get(state.policy_state), prefix="state/")
  for name in ("config", "statistics", "batch_spec"):
    (out_path / f"{name}.json").write_text(json.dumps(assets[name] if name != "config" else config.to_dict(),
                                                      indent=1, sort_keys=True, default=list))
  return out


def _save_npz(path: epath.Path, tree: Any, prefix: str) -> None:
  """npz.save_npz through a local file, then copied with epath (same filesystem layer as checkpoints)."""
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "x.npz")
    npz.save_npz(local, tree, prefix=prefix)
    with open(local, "rb") as f:
      path.write_bytes(f.read())


def _read_npz(path: epath.Path) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "x.npz")
    with open(local, "wb") as f:
      f.write(path.read_bytes())
    return npz.read_npz(local)


class BundleError(ValueError):
  """An export bundle is incomplete, corrupt or inconsistent; the message names the file and the key."""


_BUNDLE_FILES = ("params.npz", "state.npz", "config.json", "statistics.json", "batch_spec.json")
_REEXPORT = "re-export the bundle (python -m m2vla_jax.export --workdir=RUN --out=DIR)"


def _read_bundle_file(p: epath.Path, name: str) -> Any:
  """A bundle member parsed (npz -> {name: array}, json -> object); BundleError if missing or corrupt."""
  path = p / name
  if not path.exists():
    raise BundleError(f"bundle file {path} does not exist (a bundle holds {', '.join(_BUNDLE_FILES)}); "
                      f"{_REEXPORT}")
  try:
    if name.endswith(".npz"):
      return _read_npz(path)
    value = json.loads(path.read_text())
  # A cut-off zip fails in zipfile (no central directory) or, for a cut-off member, in zlib / np.load.
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
    raise BundleError(f"bundle file {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                      f"{_REEXPORT}") from e
  if not isinstance(value, dict):
    raise BundleError(f"bundle file {path} holds a {type(value).__name__}, not a JSON object; {_REEXPORT}")
  return value


def _compatible_dtype(actual: np.dtype, expected: np.dtype) -> bool:
  """Floating arrays may be stored in any float width (`export --dtype`, config.frozen_dtype); other
  dtypes (int ids, bool masks, counters) must match exactly."""
  floating = lambda d: jnp.issubdtype(d, jnp.floating)  # noqa: E731  (bfloat16 is not np.floating)
  if floating(expected):
    return floating(actual)
  return np.dtype(actual) == np.dtype(expected)


def _check_tree(path: epath.Path, noun: str, flat: Mapping[str, np.ndarray], expected: Any) -> None:
  """`flat` holds exactly the leaves of `expected` (ShapeDtypeStructs) with their shapes and dtypes."""
  want = tree_util.flatten(expected)
  missing = sorted(set(want) - set(flat))
  if missing:
    shown = ", ".join(f"{k!r} {tuple(want[k].shape)} {want[k].dtype}" for k in missing[:5])
    raise BundleError(f"bundle file {path} lacks {len(missing)} {noun}(s) the model of config.json expects: "
                      f"{shown}{' ...' if len(missing) > 5 else ''}; the bundle is incomplete or from "
                      f"another config; {_REEXPORT}")
  unexpected = sorted(set(flat) - set(want))
  if unexpected:
    raise BundleError(f"bundle file {path} holds {noun}(s) the model of config.json does not have: "
                      f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; the bundle is from "
                      f"another config; {_REEXPORT}")
  for k in sorted(want):
    got, ref = flat[k], want[k]
    if tuple(np.shape(got)) != tuple(ref.shape):
      raise BundleError(f"bundle file {path}: {noun} {k!r} has shape {tuple(np.shape(got))}, the model "
                        f"of config.json expects {tuple(ref.shape)}; {_REEXPORT}")
    if not _compatible_dtype(np.asarray(got).dtype, ref.dtype):
      raise BundleError(f"bundle file {path}: {noun} {k!r} has dtype {np.asarray(got).dtype}, the model "
                        f"of config.json expects {ref.dtype}; {_REEXPORT}")


def _check_statistics(path: epath.Path, statistics: Mapping[str, Any], config) -> None:
  """Normalization mode known; per dataset, action/state statistics of one length each, no wider than the
  config's model.action_dim / state_dim (narrower datasets are zero-padded), gripper mask as long."""
  mode = statistics.get("normalization", "bounds")
  if mode not in stats_lib.MODES:
    raise BundleError(f"bundle file {path}: normalization={mode!r} is not one of {stats_lib.MODES}; "
                      f"{_REEXPORT}")
  datasets = statistics.get("datasets")
  if not isinstance(datasets, dict) or not datasets:
    raise BundleError(f"bundle file {path} has no per-dataset statistics ('datasets'); {_REEXPORT}")
  model = config.get("model") or {}
  dims = {"action": model.get("action_dim"), "state": model.get("state_dim")}
  for key, dim in dims.items():
    top = statistics.get(f"{key}_dim")
    if dim is not None and top is not None and top != dim:
      raise BundleError(f"bundle file {path}: {key}_dim={top} but config.json's model.{key}_dim={dim}; "
                        f"the statistics are from another run; {_REEXPORT}")
  needed = {"zscore": ("mean", "std"), "bounds": ("mean", "q01", "q99"), "none": ("mean",)}[mode]
  for name, st in datasets.items():
    for key, dim in dims.items():
      block = st.get(key) if isinstance(st, dict) else None
      where = f"datasets/{name}/{key}"
      if not isinstance(block, dict) or any(f not in block for f in needed):
        raise BundleError(f"bundle file {path}: {where} lacks some of {list(needed)} "
                          f"(normalization={mode!r}); {_REEXPORT}")
      lengths = {f: len(v) for f, v in block.items() if isinstance(v, (list, tuple))}
      if len(set(lengths.values())) != 1:
        raise BundleError(f"bundle file {path}: {where} fields have different lengths {lengths}; "
                          f"{_REEXPORT}")
      d = next(iter(lengths.values()))
      if dim is not None and d > dim:
        raise BundleError(f"bundle file {path}: {where} has {d} dims, more than config.json's "
                          f"model.{key}_dim={dim}; the statistics are from another run; {_REEXPORT}")
      if key == "action" and "action_gripper_mask" in st and len(st["action_gripper_mask"]) != d:
        raise BundleError(f"bundle file {path}: datasets/{name}/action_gripper_mask has "
                          f"{len(st['action_gripper_mask'])} entries, the action statistics {d}; "
                          f"{_REEXPORT}")


def _strip(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def load_policy(path: str) -> policy_lib.InferencePolicy:
  """Loads a bundle written by `export` (local or gs://), checking all of it first.

  Raises:
    BundleError: a file is missing, truncated or corrupt; a parameter or state array the config's policy
      expects is missing, unexpected, or of another shape or dtype; or the statistics do not fit the
      config's action / state dims. The message names the file and the key.
  """
  p = epath.Path(path)
  files = {name: _read_bundle_file(p, name) for name in _BUNDLE_FILES}
  config = restore.config_from_json(files["config.json"])
  statistics, batch_spec = files["statistics.json"], files["batch_spec.json"]
  _check_statistics(p / "statistics.json", statistics, config)
  try:
    policy = trainer.build_policy(config)
    example = trainer.example_from_spec(batch_spec)
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise BundleError(f"bundle {p}: config.json / batch_spec.json do not build the policy "
                      f"({type(e).__name__}: {e}); {_REEXPORT}") from e
  # Shapes only: nothing is initialised, but every parameter and state array the policy will read is known.
  expected_params, expected_state = jax.eval_shape(policy.init, jax.random.PRNGKey(0), example)
  flat_params = _strip(files["params.npz"], "params/")
  flat_state = _strip(files["state.npz"], "state/")
  _check_tree(p / "params.npz", "parameter", flat_params, expected_params)
  _check_tree(p / "state.npz", "state array", flat_state, expected_state)
  return policy_lib.InferencePolicy(config, tree_util.unflatten(flat_params), tree_util.unflatten(flat_state), statistics,
                batch_spec, policy=policy)
