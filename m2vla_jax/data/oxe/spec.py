"""Typed registry entries: how one RLDS dataset maps onto the standard step (cameras, state, action, text).

A `DatasetSpec` is pure data. `standardize_episode` applies it to one episode given as flat numpy
arrays (`'observation/state'` -> [T, 7], ...) and returns the standard episode:

  images:      {slot: object array [T] of encoded image bytes}   slots from `spec.cameras`
  state:       float32 [T, S]
  action:      float32 [T, A]     gripper dims absolute, 1 = open, 0 = closed
  instruction: list[str] of length T

Actions are concatenations of `Field`s; a field with `gripper=` set marks its dims in the per-dimension
gripper mask (those dims are never normalized) and says how the raw value becomes an absolute gripper
command. Conventions follow the published OXE feature specs (octo's `oxe_dataset_configs.py` /
`oxe_standardization_transforms.py`, openvla's additions for fmb / dobbe / droid).
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
  RELATIVE = "relative"      # > 0.1 closes, < -0.1 opens, otherwise keep: integrated to absolute
  BINARIZE = "binarize"      # continuous in [0, 1]: > 0.95 open, < 0.05 closed, in between takes the
                             # next decided value (bridge)


@dataclasses.dataclass(frozen=True)
class Field:
  """Columns `[start:stop]` of the step feature `key` ('/'-joined path), or a constant if key is None.

  op: 'id', 'quat_to_euler' (xyzw quaternion [T, 4] -> roll-pitch-yaw [T, 3]) or 'zlib_float32' (a
  zlib-compressed float32 buffer per step, as kuka stores its state).
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


def rel2abs_gripper(x: np.ndarray) -> np.ndarray:
  """Relative gripper commands [T] (+1 close, -1 open, ~0 keep) -> absolute [T] (1 open, 0 closed).

  Before the first command the gripper is assumed to be in the state opposite to it (a first 'close'
  means it was open); with no command at all it is open throughout.
  """
  thr = np.where(x < -0.1, 1.0, np.where(x > 0.1, -1.0, 0.0))
  nonzero = np.flatnonzero(thr)
  carry = -thr[nonzero[0]] if nonzero.size else 1.0
  out = np.empty_like(thr)
  for t, v in enumerate(thr):
    carry = v if v != 0 else carry
    out[t] = carry
  return out / 2 + 0.5


def binarize_gripper(x: np.ndarray) -> np.ndarray:
  """Continuous gripper [T] -> {0, 1}: > 0.95 open, < 0.05 closed, in-between values take the next
  decided value (scanning from the end, starting from the raw last value)."""
  out = np.empty(x.shape, np.float64)
  carry = float(x[-1]) if x.size else 0.0
  for t in range(x.shape[0] - 1, -1, -1):
    if x[t] > 0.95:
      carry = 1.0
    elif x[t] < 0.05:
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
  if g is Gripper.OPEN_1:
    return x
  if g is Gripper.CLIP_OPEN_1:
    return np.clip(x, 0, 1)
  if g is Gripper.CLOSED_1:
    return 1 - np.clip(x, 0, 1)
  cols = [rel2abs_gripper(c) if g is Gripper.RELATIVE else binarize_gripper(c) for c in x.T]
  return np.stack(cols, -1) if cols else x


def _field_values(f: Field, steps: Mapping[str, np.ndarray], t: int, loc) -> np.ndarray:
  if f.key is None:
    return np.full((t, f.size), f.value, np.float64)
  if f.key not in steps:
    raise DataError(f"{loc(f.key)}: missing; the episode has {sorted(steps)}. Fix the registry entry.")
  raw = steps[f.key]
  if f.op == "zlib_float32":
    raw = np.stack([np.frombuffer(zlib.decompress(b), np.float32) for b in raw]) if len(raw) else np.zeros((0, 1))
  x = np.asarray(raw)
  if x.dtype == object or x.dtype.kind in "SU":
    raise DataError(f"{loc(f.key)}: expected numbers, got dtype {x.dtype}.")
  x = x.astype(np.float64).reshape(t, -1)
  x = x[:, f.start:f.stop]
  if f.op == "quat_to_euler":
    if x.shape[1] != 4:
      raise DataError(f"{loc(f.key)}: quat_to_euler needs 4 columns, got {x.shape[1]}.")
    x = quat_to_euler(x)
  if f.gripper is not None:
    x = _convert_gripper(x, f.gripper)
  return x


def gripper_mask(spec: DatasetSpec, widths: Sequence[int]) -> np.ndarray:
  """bool [A]: True on dims produced by gripper fields, given each action field's width."""
  return np.concatenate([np.full(w, f.gripper is not None) for f, w in zip(spec.action, widths)])


def _decode_text(x, fmt: str) -> str:
  if fmt == "codepoints":
    cps = np.asarray(x).reshape(-1)
    end = np.flatnonzero(cps == 0)
    cps = cps[: end[0]] if end.size else cps
    return "".join(map(chr, cps.tolist()))
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def standardize_episode(spec: DatasetSpec, steps: Mapping[str, np.ndarray], episode: int,
                        file_path: str | None = None) -> dict:
  """Standard episode (see module docstring) from flat step arrays; raises DataError naming the field.

  Also returns 'action_widths': the width of each action field (for `gripper_mask`).
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
    images[slot] = steps[path]
  parts = [_field_values(f, steps, t, loc) for f in spec.action]
  action = np.concatenate(parts, -1).astype(np.float32)
  state_parts = [_field_values(f, steps, t, loc) for f in spec.state]
  state = (np.concatenate(state_parts, -1) if state_parts else np.zeros((t, 0))).astype(np.float32)
  for name, arr in (("action", action), ("state", state)):
    bad = ~np.isfinite(arr)
    if bad.any():
      step, dim = np.argwhere(bad)[0]
      raise DataError(f"{loc(name, int(step))} dim {int(dim)}: non-finite value {arr[step, dim]} "
                      f"({int(bad.any(-1).sum())} bad steps); drop the episode or set "
                      "skip_bad_episodes=True.")
  if spec.instruction_key is None:
    instruction = [""] * t
  else:
    if spec.instruction_key not in steps:
      raise DataError(f"{loc(spec.instruction_key)}: instruction key missing.")
    instruction = [_decode_text(x, spec.instruction_format) for x in steps[spec.instruction_key]]
  return {"images": images, "state": state, "action": action, "instruction": instruction,
          "action_widths": [p.shape[1] for p in parts]}
