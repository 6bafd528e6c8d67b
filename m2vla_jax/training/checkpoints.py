"""Checkpoints of a training run (local or gs://), on top of orbax's async `CheckpointManager`.

Owns what a checkpoint holds and how a run resumes:
  state     - step, trainable params, optimizer state, EMA, run rng, policy state (MSM memory); the frozen
              backbone is not saved (it is rebuilt by `init` from the pretrained weights the config names).
  data      - the data iterator's state (JSON), so a resumed run sees exactly the batches it would have seen.
  assets    - the config and the normalization statistics (JSON), so export and evaluation need only the
              checkpoint directory.
  checksums - {array path: dtype, shape, digest} of every array in `state` (JSON), written by the same save,
              so a step is only complete with it.

Every restore is verified: each array's digest, dtype and shape must match `checksums`, and every float
array must be finite. Orbax itself does not notice flipped bytes inside an array data file, so without this
a corrupt value would land silently in the params, the optimizer state or the MSM memory. Checkpoints
written before checksums existed still restore (with a warning that they are unverified; the finiteness
check still applies).

The digest is two 32-bit sums over the array's raw bits, weighted by a hash of each element's global index,
computed on the devices: it needs no host copy of the array, and it is the same whatever the sharding (a
run restored on another mesh, export on one device) and on every host of a multi-host run, which each hold
only part of an array. Any single changed element always changes it; random corruption of several elements
goes unnoticed with probability about 2**-64.

Resume takes the newest checkpoint that restores and verifies. A checkpoint that fails to (a truncated,
missing or unreadable file, a checksum mismatch, a non-finite value) is moved out of the manager's directory
into `<directory>/../checkpoints_corrupt/` with a warning naming its step and, for a bad array, the array's
path, and the previous one is tried; nothing is deleted, and because the bad step no longer counts among the
manager's checkpoints, keep-N can never delete a good checkpoint in its favour. A step that cannot be moved
there (e.g. a directory without write permission) is renamed within the manager's directory to
`<step>-<time>.corrupt`, a name orbax ignores; one that cannot be renamed either is skipped where it lies,
and keep-N deletion stops until someone moves it away (it would count among the kept steps).
Orbax only finalises a step (renames its temporary directory) after every file is written, so a process
killed mid-save leaves no step for resume to pick.
"""
from __future__ import annotations

import json
import time
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKSUM_ALGORITHM = "index-weighted-sum32x2-v1"


class CorruptCheckpointError(ValueError):
  """A checkpoint restored, but an array in it is not what was saved (checksum) or is not finite."""


def _to_json(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, bytes):
    return {"__bytes__": x.decode("latin-1")}
  return x


def _from_json(x: Any) -> Any:
  if isinstance(x, dict):
    if set(x) == {"__bytes__"}:
      return x["__bytes__"].encode("latin-1")
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


def _files_under(directory: epath.Path):
  """Every file below `directory`, by listing level by level.

  Not `rglob`/`walk`: etils refuses recursive globs on gs://, and its fsspec `walk` yields bucket-relative
  roots without the `gs://` scheme, which would turn into local paths.
  """
  for path in directory.iterdir():
    if path.is_dir():
      yield from _files_under(path)
    else:
      yield path


def _move_tree(src: epath.Path, dst: epath.Path) -> None:
  """Rename, or copy then delete where the filesystem cannot rename directories (object stores)."""
  dst.parent.mkdir(parents=True, exist_ok=True)
  try:
    src.rename(dst)
    return
  except Exception:  # gs:// has no directories: no rename, and `dst.parent` does not "exist" while empty.
    pass
  for path in list(_files_under(src)):
    target = dst / path.relative_to(src)
    target.parent.mkdir(parents=True, exist_ok=True)
    path.copy(target)
  src.rmtree()


def _state_item(state: Any) -> dict:
  """The saved part of a TrainState (everything but the frozen backbone; None fields dropped)."""
  item = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng,
          "policy_state": state.policy_state}
  if state.ema is not None:
    item["ema"] = state.ema
  return item


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection on uint32 that mixes every input bit into every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 (8-byte dtypes get a trailing axis of 2), value-for-value."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_ or (jnp.issubdtype(x.dtype, jnp.integer) and x.dtype.itemsize < 4):
    return x.astype(jnp.uint32)  # Injective for these: equal bits iff equal values.
  if x.dtype.itemsize in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  if x.dtype.itemsize in (1, 2):  # bf16, f16, fp8: reinterpret, then widen.
    return lax.bitcast_convert_type(x, jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16).astype(jnp.uint32)
  raise TypeError(f"checkpoint checksums do not support dtype {x.dtype}")


def _digest_and_finite(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(uint32 [2] digest, bool finite) of one array; see the module docstring. Pure, sharding-agnostic."""
  x = jnp.asarray(x)
  bits = _bits(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):  # Global row-major element index (mod 2**32), built per axis so
    index = index + lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[d]             # each shard computes its own part without a reshape.
  weight = _fmix32(index ^ jnp.uint32(0x9E3779B9)) | jnp.uint32(1)  # odd: a changed element always shows
  linear = jnp.sum(bits * weight, dtype=jnp.uint32)
  mixed = jnp.sum(_fmix32(bits ^ _fmix32(index + jnp.uint32(0x7F4A7C15))), dtype=jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    finite = jnp.isfinite(x).all()
  else:
    finite = jnp.ones((), jnp.bool_)
  return jnp.stack([linear, mixed]), finite


_digests_and_finite = jax.jit(lambda tree: jax.tree_util.tree_map(_digest_and_finite, tree))


def _array_report(item: Mapping[str, Any]) -> dict[str, dict]:
  """{array path: {'dtype', 'shape', 'digest', 'finite'}} of every array of a state item (on any host)."""
  leaves = jax.tree_util.tree_flatten_with_path(item)[0]
  computed = jax.tree_util.tree_leaves(_digests_and_finite([leaf for _, leaf in leaves]))
  # Scalars out of an SPMD program are replicated: every host holds the whole value. One transfer for all.
  host = jax.device_get([r.addressable_data(0) for r in computed])
  report = {}
  for i, (path, leaf) in enumerate(leaves):
    digest, finite = host[2 * i], host[2 * i + 1]
    report[jax.tree_util.keystr(path, simple=True, separator="/")] = {
        "dtype": str(leaf.dtype if hasattr(leaf, "dtype") else jnp.asarray(leaf).dtype),
        "shape": [int(n) for n in np.shape(leaf)],
        "digest": "".join(f"{int(v):08x}" for v in digest), "finite": bool(finite)}
  return report


def _checksums(item: Mapping[str, Any]) -> dict:
  """The `checksums` item of a state item."""
  arrays = {path: {k: v for k, v in entry.items() if k != "finite"}
            for path, entry in _array_report(item).items()}
  return {"algorithm": CHECKSUM_ALGORITHM, "arrays": arrays}


def _verify(step: int, item: Mapping[str, Any], checksums: Optional[Mapping[str, Any]]) -> None:
  """Raises CorruptCheckpointError naming the step and the first bad array; None checksums: finiteness only."""
  report = _array_report(item)
  if checksums is not None:
    if checksums.get("algorithm") != CHECKSUM_ALGORITHM:
      raise CorruptCheckpointError(f"checkpoint {step}: unknown checksum algorithm {checksums.get('algorithm')!r} "
                                   f"(this code writes {CHECKSUM_ALGORITHM!r})")
    saved = checksums.get("arrays", {})
    for path, got in report.items():
      want = saved.get(path)
      if want is None:
        raise CorruptCheckpointError(f"checkpoint {step}: array {path} has no checksum")
      for key in ("dtype", "shape", "digest"):
        if want.get(key) != got[key]:
          raise CorruptCheckpointError(f"checkpoint {step}: array {path} fails its checksum ({key} "
                                       f"{got[key]} restored, {want.get(key)} saved)")
    if set(saved) - set(report):
      raise CorruptCheckpointError(f"checkpoint {step}: arrays {sorted(set(saved) - set(report))} were saved but "
                                   "not restored")
  for path, got in report.items():
    if not got["finite"]:
      raise CorruptCheckpointError(f"checkpoint {step}: array {path} holds non-finite values")


def _warn(message: str) -> None:
  """To the log and to stdout (a resumed run's console shows why it went back)."""
  logging.warning("%s", message)
  print(f"WARNING: {message}", flush=True)


def _caused_by(error: BaseException, kind: type) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, kind):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


class Checkpointer:
  """Saves and restores TrainStates under `directory` (a local path or gs:// URL).

  Args:
    directory: where step directories live.
    keep: keep the newest `keep` checkpoints (None: all).
    keep_every: additionally keep every checkpoint whose step is a multiple of this (None: none).
    async_save: write in a background thread while training continues.
    use_ocdbt: orbax's OCDBT array store (few large files; default) or one zarr directory per array.
      Both work on gs:// (OCDBT commits its manifest by generation-conditioned writes, which GCS serves;
      see docs/GCS.md for the emulator the tests use).
  """

  def __init__(self, directory: str, keep: Optional[int] = 3, keep_every: Optional[int] = None,
               async_save: bool = True, use_ocdbt: bool = True):
    self.directory = epath.Path(directory)
    self.keep, self.keep_every, self.async_save = keep, keep_every, async_save
    self.use_ocdbt = use_ocdbt
    # Bad steps that could be neither moved nor renamed: skipped by resume, never saved over, and while
    # any exist keep-N deletes nothing (the manager would count them among the kept steps).
    self._stuck: set[int] = set()
    self._warned_unverified = False
    self._mgr = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    keep, keep_every = (None, None) if self._stuck else (self.keep, self.keep_every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep or None, keep_period=keep_every or None, create=True,
        enable_async_checkpointing=self.async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=self.use_ocdbt),
                "data": ocp.JsonCheckpointHandler(), "assets": ocp.JsonCheckpointHandler(),
                "checksums": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def all_steps(self) -> list[int]:
    return sorted(set(self._mgr.all_steps()) - self._stuck)

  def save(self, state: Any, data_state: Mapping[str, Any] | None, assets: Mapping[str, Any]) -> None:
    step = int(jax.device_get(state.step))
    if step in self._stuck:
      _warn(f"not saving checkpoint step {step}: {self.directory / str(step)} is a bad checkpoint that could "
            "not be moved away; move it out of the way by hand")
      return
    item = _state_item(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(item),
        data=ocp.args.JsonSave(_to_json(data_state or {})),
        assets=ocp.args.JsonSave(_to_json(assets)),
        checksums=ocp.args.JsonSave(_checksums(item)))
    self._mgr.save(step, args=args, force=True)

  def wait(self) -> None:
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()

  def reached_preemption(self, step: int) -> bool:
    """True on every host once a preemption notice (multi-host SIGTERM) has been seen by any host."""
    return self._mgr.reached_preemption(step)

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, assets) of one step, verified; raises if it cannot be read or does not verify."""
    target = _state_item(abstract_state)
    # Listing the step also fails early, with the OSError, when its directory cannot be read.
    verified = "checksums" in {p.name for p in (self.directory / str(step)).iterdir()}
    args = dict(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                assets=ocp.args.JsonRestore())
    if verified:
      args["checksums"] = ocp.args.JsonRestore()
    restored = self._mgr.restore(step, args=ocp.args.Composite(**args))
    item = restored["state"]
    got_step = int(jax.device_get(item["step"]))
    if got_step != step:
      raise ValueError(f"checkpoint {step} holds state of step {got_step}")
    if not verified and not self._warned_unverified:
      self._warned_unverified = True
      _warn(f"checkpoint step {step} in {self.directory} predates checkpoint checksums: its arrays are "
            "restored unverified (only checked finite)")
    _verify(step, item, restored["checksums"] if verified else None)
    state = abstract_state.replace(
        step=item["step"], trainable=item["trainable"], opt_state=item["opt_state"],
        ema=item.get("ema"), rng=item["rng"], policy_state=item["policy_state"])
    return state, _from_json(restored["data"]), _from_json(restored["assets"])

  def _set_aside(self, step: int, error: Exception) -> None:
    """Moves a bad step out of the manager's directory (see the module docstring); never deletes, never raises."""
    what = "unreadable" if _caused_by(error, PermissionError) else "corrupt"
    stamp = int(time.time())
    bad_dir = self.directory / str(step)
    targets = [self.directory.parent / "checkpoints_corrupt" / f"{step}-{stamp}",
               self.directory / f"{step}-{stamp}.corrupt"]  # Same parent: needs no write access to the step.
    moved_to = targets[0]
    if jax.process_index() == 0:
      moved_to = None
      for target in targets:
        try:
          _move_tree(bad_dir, target)
          moved_to = target
          break
        except Exception as move_error:  # pylint: disable=broad-except
          logging.warning("Could not move checkpoint %s to %s (%s: %s)", bad_dir, target,
                          type(move_error).__name__, move_error)
    reason = f"{type(error).__name__}: {str(error)[:500]}"
    if moved_to is not None:
      _warn(f"checkpoint step {step} is {what} ({reason}); moved to {moved_to}; trying the previous checkpoint")
    else:
      self._stuck.add(step)
      _warn(f"checkpoint step {step} is {what} ({reason}) and could not be moved; skipping it, left in place at "
            f"{bad_dir} (nothing deleted; keep-N deletes nothing until it is moved away by hand); trying the "
            "previous checkpoint")
    self._mgr.close()
    self._mgr = self._make_manager()

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict, dict]]:
    """(state, data_state, assets) of the newest checkpoint that restores, or None if there is none.

    `abstract_state`: a TrainState whose leaves are ShapeDtypeStructs carrying shardings, except `frozen`,
    which must hold the real frozen arrays (they are passed through).
    """
    for step in reversed(self.all_steps()):
      try:
        return self._restore_step(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # Any failure to read a step: cannot be trusted.
        self._set_aside(step, e)
    return None

  def restore_assets(self, step: Optional[int] = None) -> dict:
    step = self._mgr.latest_step() if step is None else step
    return _from_json(self._mgr.restore(step, args=ocp.args.Composite(assets=ocp.args.JsonRestore()))["assets"])


def read_assets(directory: str, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, assets) of a checkpoint directory without building a model (export, evaluation)."""
  mgr = ocp.CheckpointManager(epath.Path(directory), options=ocp.CheckpointManagerOptions(read_only=True),
                              item_names=("state", "data", "assets"))
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  assets = mgr.restore(step, args=ocp.args.Composite(assets=ocp.args.JsonRestore()))["assets"]
  mgr.close()
  return step, _from_json(assets)


def dump_json(path: epath.Path, obj: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(_to_json(obj), indent=1, sort_keys=True))
