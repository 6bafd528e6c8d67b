"""Visual shifts never seen in training, applied to a MuJoCo model before rendering (LIBERO-Plus style).

Owns the perturbations of the robustness evaluation: the scene, the physics and the task stay the same
and only what the camera sees changes, so a drop in success measures how much a policy's features
depend on incidental appearance.

  'camera'    the named camera moved by `camera_offset_m` (along a fixed diagonal: x, -y, z) and
              rotated by `camera_rotation_deg` about its own viewing axis and a horizontal axis
  'lighting'  the lights' and the headlight's diffuse and ambient colours scaled by `light_scale` per
              channel (dimmer and warmer; Meta-World's flat look comes mostly from the headlight's
              ambient term) and the lights moved by `light_offset_m` (highlights move)
  'colors'    every material's and geom's RGB multiplied by `tint` (a warm cast: the wooden table,
              the objects and the robot all change hue; textures are modulated by their material)
  'all'       the three together

`apply(model, shift, camera)` edits the `mujoco.MjModel` in place; the environment applies it once
after building its model (`metaworld_env.EnvConfig.visual_shift`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("camera", "lighting", "colors", "all")


@dataclasses.dataclass(frozen=True)
class VisualShift:
  kind: str
  camera_offset_m: float = 0.04
  camera_rotation_deg: float = 4.0
  light_scale: tuple[float, float, float] = (0.75, 0.6, 0.45)
  light_offset_m: float = 0.5
  tint: tuple[float, float, float] = (1.0, 0.78, 0.6)

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"visual shift kind={self.kind!r}; use one of {KINDS}")

  def has(self, part: str) -> bool:
    return self.kind in (part, "all")


def _axis_angle_quat(axis: np.ndarray, degrees: float) -> np.ndarray:
  axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  half = np.deg2rad(degrees) / 2
  return np.concatenate([[np.cos(half)], np.sin(half) * axis])


def _quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  w1, x1, y1, z1 = a
  w2, x2, y2, z2 = b
  return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                   w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def apply(model, shift: VisualShift, camera: str) -> None:
  """Edits `model` (a mujoco.MjModel) in place; `camera` is the camera the policy sees."""
  import mujoco  # pylint: disable=g-import-not-at-top
  if shift.has("camera"):
    cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    if cam < 0:
      raise ValueError(f"visual shift 'camera': the model has no camera {camera!r}")
    model.cam_pos[cam] += shift.camera_offset_m * np.array([1.0, -1.0, 1.0]) / np.sqrt(3.0)
    # Camera frame: -z is the viewing axis; rotate about it (roll) and about the camera's x (tilt).
    turn = _quat_mul(_axis_angle_quat([0, 0, 1], shift.camera_rotation_deg),
                     _axis_angle_quat([1, 0, 0], shift.camera_rotation_deg))
    q = _quat_mul(np.asarray(model.cam_quat[cam], np.float64), turn)
    model.cam_quat[cam] = q / np.linalg.norm(q)
  if shift.has("lighting"):
    scale = np.asarray(shift.light_scale, np.float32)
    model.light_diffuse[:] = model.light_diffuse * scale
    model.light_ambient[:] = model.light_ambient * scale
    model.light_pos[:] = model.light_pos + shift.light_offset_m * np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
    head = model.vis.headlight
    head.diffuse[:] = np.asarray(head.diffuse) * scale
    head.ambient[:] = np.asarray(head.ambient) * scale
  if shift.has("colors"):
    tint = np.asarray(shift.tint, np.float32)
    model.mat_rgba[:, :3] = np.clip(model.mat_rgba[:, :3] * tint, 0.0, 1.0)
    model.geom_rgba[:, :3] = np.clip(model.geom_rgba[:, :3] * tint, 0.0, 1.0)
