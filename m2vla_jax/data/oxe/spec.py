"""Typed registry entries: how one RLDS dataset maps onto the standard step (cameras, state, action, text).

A `DatasetSpec` is pure data. `standardize_episode` applies it to one episode given as flat numpy
arrays (`'observation/state'` -> [T, 7], ...) and returns the standard episode:

  images:      {slot: object array [T] of encoded image bytes}   slots from `spec.cameras`
  state:       float32 [T, S]     the OXE 8-dim layouts for registry entries (see registry.py)
  action:      float32 [T, A]     gripper dims absolute, 1 = open, 0 = closed
  instruction: list[str] of length T

State and action are concatenations of `Field`s; a field with `gripper=` set marks its dims in the
per-dimension gripper mask (those dims are never normalized) and says how the raw value becomes an
absolute gripper command; a constant field (key None) marks padding dims (never normalized either).
Conventions follow the published OXE feature specs (octo's `oxe_dataset_configs.py` /
`oxe_standardization_transforms.py`, openvla's additions for fmb / dobbe / droid).

Every failure here is a `DataError` naming dataset, episode (and file), step where there is one, and the
field: missing or wrong-typed features, undecodable zlib buffers, non-finite values (checked on the raw
values, before a gripper conversion could turn a NaN into a valid 0/1), undecodable instruction bytes.
Gripper thresholds (0.1 relative, 0.95 / 0.05 binarize) are compared in the raw feature's dtype, as
octo's tf ops compare them: a float32 command of exactly 0.1 is 'no change', not 'close'.
"""
from __future__ import annotations

import dataclasses
import enum
import zlib
from typing import Mapping, Sequence

import numpy as np

from m2vla_jax.data.errors import DataError, where


class ActionEncoding(enum.Enum):
  EEF_DELTA = "eef_delta"       # xyz delta + roll-pitch-yaw delta + gripper
  EEF_ABSOLUTE = "eef_absolute" # absolute EEF pose + gripper
  JOINT = "joint"               # joint positions/deltas + gripper
  JOINT_BIMANUAL = "joint_bimanual"


class Gripper(enum.Enum):
  """How raw gripper values become absolute commands with 1 = open, 0 = closed."""
  OPEN_1 = "open_1"          # already absolute, 1 = open; kept as is (bool cast to float)
  CLIP_OPEN_1 = "clip_open_1"  # absolute with 1 = open, but outside [0, 1] (e.g. -1/+1): clipped
  CLOSED_1 = "closed_1"      # absolute, 1 = closed: clipped to [0, 1] then inverted
  RELATIVE = "relative"      # > 0.1 closes, < -0.1 opens, otherwise keep (thresholds in the raw
                             # dtype): integrated to absolute
  BINARIZE = "binarize"      # continuous in [0, 1]: > 0.95 open, < 0.05 closed, in between takes the
                             # next decided value (bridge)


def signed_gripper(absolute):
  """The registry's absolute gripper (1 = open, 0 = closed) -> the signed command robosuite-based
  simulators such as LIBERO take (-1 opens, +1 closes): the inverse of `Gripper.CLOSED_1` on a
  -1 / +1 source. Works on numpy arrays and floats alike."""
  return 1.0 - 2.0 * absolute


@dataclasses.dataclass(frozen=True)
class Field:
  """Columns `[start:stop]` of the step feature `key` ('/'-joined path), or a constant if key is None
  (`size` columns of `value`: padding, e.g. the pad column of the 8-dim OXE state layout).

  op: 'id', 'quat_to_euler' (xyzw quaternion [T, 4] -> roll-pitch-yaw [T, 3]) or 'zlib_float32' (kuka's
  pose / gripper / height tensors, published as float32 Tensor features with TFDS's zlib encoding:
  TFDS decoding, which `rlds.RawReader` uses, returns them as float32 arrays; readers that skip TFDS
  decoding, like octo's, see one zlib-compressed float32 buffer per step. Both forms are accepted).
  """
  key: str | None
  start: int | None = None
  stop: int | None = None
  size: int = 1          # width of a constant field
  value: float = 0.0     # value of a constant field
  op: str = "id"
  gripper: Gripper | None = None

  def __post_init__(self):
    if self.op not in ("id", "quat_to_euler", "zlib_float32"):
      raise ValueError(f"Field {self.key!r}: unknown op {self.op!r}; use 'id', 'quat_to_euler' or 'zlib_float32'.")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One registry entry. `name` is the TFDS builder (directory) name; `cameras` maps batch slots
  ('primary', 'secondary', 'wrist') to observation image keys; absent slots are omitted."""
  name: str
  cameras: Mapping[str, str]
  state: tuple[Field, ...]
  action: tuple[Field, ...]
  action_encoding: ActionEncoding = ActionEncoding.EEF_DELTA
  instruction_key: str | None = "language_instruction"   # None: no usable instruction ('' is used)
  instruction_format: str = "text"                        # 'text' or 'codepoints' (int array, 0-padded)
  version: str | None = None                              # None: newest version directory on disk

  def __post_init__(self):
    if not self.action:
      raise ValueError(f"DatasetSpec {self.name!r}: `action` needs at least one Field.")
    if self.instruction_format not in ("text", "codepoints"):
      raise ValueError(f"DatasetSpec {self.name!r}: instruction_format must be 'text' or 'codepoints'.")

  def required_keys(self) -> list[str]:
    """Every step feature path the entry reads."""
    keys = [f"observation/{k}" for k in self.cameras.values()]
    keys += [f.key for f in self.state + self.action if f.key is not None]
    if self.instruction_key is not None:
      keys.append(self.instruction_key)
    return keys

  def fingerprint(self) -> str:
    """Stable text of the entry (statistics cache key)."""
    def enc(x):
      if isinstance(x, enum.Enum):
        return x.value
      if isinstance(x, Mapping):
        return {k: enc(v) for k, v in sorted(x.items())}
      if isinstance(x, (list, tuple)):
        return [enc(v) for v in x]
      if dataclasses.is_dataclass(x):
        return {f.name: enc(getattr(x, f.name)) for f in dataclasses.fields(x)}
      return x
    return repr(enc(self))


def _threshold(x: np.ndarray, value: float):
  """`value` in x's float dtype, so comparisons round like octo's tf ops (float32 data, float32 constant)."""
  return x.dtype.type(value) if x.dtype.kind == "f" else value


def rel2abs_gripper(x: np.ndarray) -> np.ndarray:
  """Relative gripper commands [T] (+1 close, -1 open, ~0 keep) -> absolute [T] (1 open, 0 closed).

  Before the first command the gripper is assumed to be in the state opposite to it (a first 'close'
  means it was open); with no command at all it is open throughout. The +-0.1 thresholds are strict and
  in x's dtype: float32(0.1) is 'keep', as in octo's `rel2abs_gripper_actions`.
  """
  x = np.asarray(x)
  lo, hi = _threshold(x, -0.1), _threshold(x, 0.1)
  thr = np.where(x < lo, 1.0, np.where(x > hi, -1.0, 0.0))
  nonzero = np.flatnonzero(thr)
  carry = -thr[nonzero[0]] if nonzero.size else 1.0
  out = np.empty_like(thr)
  for t, v in enumerate(thr):
    carry = v if v != 0 else carry
    out[t] = carry
  return out / 2 + 0.5


def binarize_gripper(x: np.ndarray) -> np.ndarray:
  """Continuous gripper [T] -> {0, 1}: > 0.95 open, < 0.05 closed, in-between values take the next
  decided value (scanning from the end, starting from the raw last value). Thresholds in x's dtype."""
  x = np.asarray(x)
  hi, lo = _threshold(x, 0.95), _threshold(x, 0.05)
  out = np.empty(x.shape, np.float64)
  carry = float(x[-1]) if x.size else 0.0
  for t in range(x.shape[0] - 1, -1, -1):
    if x[t] > hi:
      carry = 1.0
    elif x[t] < lo:
      carry = 0.0
    out[t] = carry
  return out


def quat_to_euler(q: np.ndarray) -> np.ndarray:
  """xyzw quaternions [T, 4] -> roll, pitch, yaw [T, 3] (ZYX convention)."""
  x, y, z, w = np.moveaxis(q.astype(np.float64), -1, 0)
  roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
  pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
  yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
  return np.stack([roll, pitch, yaw], -1)


def _convert_gripper(x: np.ndarray, g: Gripper) -> np.ndarray:
  """[T, k] raw gripper columns (raw dtype) -> float64 absolute commands."""
  if g is Gripper.OPEN_1:
    return x.astype(np.float64)
  if g is Gripper.CLIP_OPEN_1:
    return np.clip(x.astype(np.float64), 0, 1)
  if g is Gripper.CLOSED_1:
    return 1 - np.clip(x.astype(np.float64), 0, 1)
  cols = [rel2abs_gripper(c) if g is Gripper.RELATIVE else binarize_gripper(c) for c in x.T]
  return np.stack(cols, -1) if cols else x.astype(np.float64)


def _inflate_float32(raw, loc, key: str) -> np.ndarray:
  """kuka's zlib fields -> float32 [T, n]: decoded tensors pass through, compressed buffers are inflated."""
  arr = raw if isinstance(raw, np.ndarray) else np.asarray(raw)
  if arr.dtype.kind in "fiub":   # TFDS already decoded the zlib encoding (our reader's path)
    return arr
  rows = []
  for step, b in enumerate(arr.reshape(len(arr), -1)[:, 0]):
    try:
      rows.append(np.frombuffer(zlib.decompress(bytes(b)), np.float32))
    except (zlib.error, TypeError, ValueError) as e:
      raise DataError(f"{loc(key, step)}: not a zlib-compressed float32 buffer ({type(e).__name__}: "
                      f"{e}); the registry entry's op='zlib_float32' expects kuka's encoding.") from e
  widths = {r.shape[0] for r in rows}
  if len(widths) > 1:
    raise DataError(f"{loc(key)}: zlib buffers decode to {sorted(widths)} float32 values in different "
                    "steps; each step must hold the same number.")
  return np.stack(rows)


def _field_values(f: Field, steps: Mapping[str, np.ndarray], t: int, loc, name: str,
                  offset: int) -> np.ndarray:
  """float64 [T, w] standardized values of one field; `name`/`offset` place it in 'action'/'state'."""
  if f.key is None:
    return np.full((t, f.size), f.value, np.float64)
  if f.key not in steps:
    raise DataError(f"{loc(f.key)}: missing; the episode has {sorted(steps)}. Fix the registry entry.")
  raw = steps[f.key]
  if f.op == "zlib_float32":
    raw = _inflate_float32(raw, loc, f.key)
  x = np.asarray(raw)
  if x.dtype == object or x.dtype.kind in "SUV":
    raise DataError(f"{loc(f.key)}: expected numbers, got dtype {x.dtype}; fix the registry entry "
                    "(op='zlib_float32' for compressed buffers) or the dataset.")
  if x.dtype.kind != "f":        # bool / int features (open_gripper, ...) become float64
    x = x.astype(np.float64)
  if x.ndim == 0 or x.shape[0] != t:
    raise DataError(f"{loc(f.key)}: {x.shape[0] if x.ndim else 0} steps, the episode has {t}.")
  x = x.reshape(t, -1)
  cols = np.arange(x.shape[1])[f.start:f.stop]
  x = x[:, f.start:f.stop]
  # Non-finite values are checked raw: clipping and the gripper conversions would turn them into
  # valid-looking 0/1 commands (bridge's binarize gives a NaN the next decided value).
  bad = ~np.isfinite(x)
  if bad.any():
    step, col = (int(v) for v in np.argwhere(bad)[0])
    raise DataError(f"{loc(name, step)} dim {offset + col}: non-finite value {x[step, col]} in raw "
                    f"feature {f.key!r} column {int(cols[col])} ({int(bad.any(-1).sum())} bad steps); "
                    "drop the episode or set skip_bad_episodes=True.")
  if f.op == "quat_to_euler":
    if x.shape[1] != 4:
      raise DataError(f"{loc(f.key)}: quat_to_euler needs 4 columns, got {x.shape[1]}.")
    x = quat_to_euler(x)
  if f.gripper is not None:
    return _convert_gripper(x, f.gripper)
  return x.astype(np.float64)


def _assemble(fields: Sequence[Field], name: str, steps, t: int, loc) -> tuple[np.ndarray, list[int]]:
  """(float32 [T, D], per-field widths) of the 'action' or 'state' fields."""
  parts, offset = [], 0
  for f in fields:
    try:
      part = _field_values(f, steps, t, loc, name, offset)
    except DataError:
      raise
    except Exception as e:  # numpy / zlib / codec errors: name the field, never leak a bare error.
      raise DataError(f"{loc(f.key or name)}: cannot standardize ({type(e).__name__}: {e}).") from e
    parts.append(part)
    offset += part.shape[1]
  out = np.concatenate(parts, -1) if parts else np.zeros((t, 0))
  return out.astype(np.float32), [p.shape[1] for p in parts]


def _field_mask(fields: Sequence[Field], widths: Sequence[int], pred) -> np.ndarray:
  if not fields:
    return np.zeros(0, bool)
  return np.concatenate([np.full(w, bool(pred(f))) for f, w in zip(fields, widths)]).astype(bool)


def gripper_mask(spec: DatasetSpec, widths: Sequence[int]) -> np.ndarray:
  """bool [A]: True on dims produced by gripper fields, given each action field's width."""
  return _field_mask(spec.action, widths, lambda f: f.gripper is not None)


def padding_mask(fields: Sequence[Field], widths: Sequence[int]) -> np.ndarray:
  """bool [D]: True on dims produced by constant fields (key None), given each field's width."""
  return _field_mask(fields, widths, lambda f: f.key is None)


def _decode_text(x, fmt: str, loc, key: str, step: int) -> str:
  try:
    if fmt == "codepoints":
      cps = np.asarray(x).reshape(-1)
      end = np.flatnonzero(cps == 0)
      cps = cps[: end[0]] if end.size else cps
      return "".join(map(chr, cps.tolist()))
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
  except (UnicodeDecodeError, ValueError, OverflowError, TypeError) as e:
    raw = bytes(x[:40]) if isinstance(x, bytes) else np.asarray(x).reshape(-1)[:10]
    raise DataError(f"{loc(key, step)}: undecodable instruction ({type(e).__name__}: {e}; starts "
                    f"{raw!r}); fix the text or set skip_bad_episodes=True.") from e


def standardize_episode(spec: DatasetSpec, steps: Mapping[str, np.ndarray], episode: int,
                        file_path: str | None = None) -> dict:
  """Standard episode (see module docstring) from flat step arrays; raises DataError naming the field.

  Also returns 'action_widths' / 'state_widths': the width of each field (for `gripper_mask`,
  `padding_mask`).
  """
  loc = lambda field, step=None: where(spec.name, episode, field, step, file_path)
  t = len(steps["is_first"]) if "is_first" in steps else len(next(iter(steps.values())))
  if t == 0:
    raise DataError(f"{loc(None)}: empty episode (0 steps).")
  images = {}
  for slot, key in spec.cameras.items():
    path = f"observation/{key}"
    if path not in steps:
      raise DataError(f"{loc(path)}: image key missing; the episode has {sorted(steps)}.")
    if len(steps[path]) != t:
      raise DataError(f"{loc(path)}: {len(steps[path])} frames, the episode has {t} steps.")
    images[slot] = steps[path]
  action, action_widths = _assemble(spec.action, "action", steps, t, loc)
  state, state_widths = _assemble(spec.state, "state", steps, t, loc)
  for name, arr in (("action", action), ("state", state)):
    bad = ~np.isfinite(arr)   # e.g. a finite float64 value beyond float32's range
    if bad.any():
      step, dim = np.argwhere(bad)[0]
      raise DataError(f"{loc(name, int(step))} dim {int(dim)}: non-finite value {arr[step, dim]} "
                      f"({int(bad.any(-1).sum())} bad steps); drop the episode or set "
                      "skip_bad_episodes=True.")
  if spec.instruction_key is None:
    instruction = [""] * t
  else:
    key = spec.instruction_key
    if key not in steps:
      raise DataError(f"{loc(key)}: instruction key missing.")
    instruction = [_decode_text(x, spec.instruction_format, loc, key, k) for k, x in enumerate(steps[key])]
  return {"images": images, "state": state, "action": action, "instruction": instruction,
          "action_widths": action_widths, "state_widths": state_widths}
