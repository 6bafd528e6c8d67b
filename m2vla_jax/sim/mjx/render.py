"""Camera images from an MJX state inside the compiled program, by ray casting with `mjx.ray`.

Owns: pinhole rays that reproduce MuJoCo's OpenGL camera (vertical `fovy`, one ray through each
pixel centre, camera looking along its -z axis with +y up), the per-pixel hit (distance and geom
id from `mjx.ray`), and from those: RGB from geom material colours with Lambert shading
(analytic normals of planes, boxes, capsules and spheres), depth as distance along the camera
axis (what `mujoco.Renderer`'s depth mode returns), and segmentation as geom ids.

    images = render(scene, data, cameras=('front',), height=64, width=64)
    images['rgb']   uint8   [C, H, W, 3]
    images['depth'] float32 [C, H, W]   metres along the optical axis; 0 where nothing is hit
    images['seg']   int32   [C, H, W]   geom id; -1 where nothing is hit

Everything is jnp and vmappable over environments (vmap `render` over a batched mjx.Data).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import mujoco
from mujoco import mjx
import numpy as np

from m2vla_jax.sim.mjx import scene as scene_lib

AMBIENT = 0.35
# Fixed light direction (towards the light) for shading, roughly the scene's sun.
_LIGHT = np.array([0.3, 0.3, 1.0], np.float32) / np.linalg.norm([0.3, 0.3, 1.0])


def camera_rays(model: mujoco.MjModel, camera: int, height: int, width: int) -> np.ndarray:
  """float32 [H*W, 3] unit ray directions in the camera frame, row-major from the top-left pixel.

  MuJoCo's camera: vertical field of view `cam_fovy`, aspect from the image, looking along -z.
  """
  half_h = np.tan(np.deg2rad(model.cam_fovy[camera]) / 2)
  half_w = half_h * width / height
  ys = (1.0 - 2.0 * (np.arange(height) + 0.5) / height) * half_h
  xs = (2.0 * (np.arange(width) + 0.5) / width - 1.0) * half_w
  x, y = np.meshgrid(xs, ys)
  dirs = np.stack([x, y, -np.ones_like(x)], -1).reshape(-1, 3)
  return (dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)).astype(np.float32)


def _camera_pose(m: mujoco.MjModel, d: mjx.Data, camera: int) -> tuple[jax.Array, jax.Array]:
  """World position [3] and rotation [3, 3] (columns = camera axes) of a fixed/body camera."""
  body = m.cam_bodyid[camera]
  rot0 = np.zeros(9)
  mujoco.mju_quat2Mat(rot0, m.cam_quat[camera])
  rot0 = rot0.reshape(3, 3)
  pos = d.xpos[body] + d.xmat[body] @ m.cam_pos[camera]
  return pos, d.xmat[body] @ rot0


def _normals(m: mjx.Model, d: mjx.Data, geom: jax.Array, point: jax.Array,
             types: np.ndarray) -> jax.Array:
  """World normals [P, 3] at hit points [P, 3] of geoms [P] (any id where there is no hit)."""
  g = jnp.maximum(geom, 0)
  rot, size = d.geom_xmat[g], m.geom_size[g]
  local = jnp.einsum("pji,pj->pi", rot, point - d.geom_xpos[g])
  kind = jnp.asarray(types)[g]
  plane = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), local.shape)
  ratio = jnp.abs(local) / jnp.maximum(size, 1e-9)
  face = jax.nn.one_hot(jnp.argmax(ratio, -1), 3) * jnp.sign(local)
  axis_pt = jnp.stack([jnp.zeros_like(local[:, 0]), jnp.zeros_like(local[:, 0]),
                       jnp.clip(local[:, 2], -size[:, 1], size[:, 1])], -1)
  capsule = local - axis_pt
  sphere = local
  n = jnp.where((kind == int(mujoco.mjtGeom.mjGEOM_PLANE))[:, None], plane,
                jnp.where((kind == int(mujoco.mjtGeom.mjGEOM_BOX))[:, None], face,
                          jnp.where((kind == int(mujoco.mjtGeom.mjGEOM_CAPSULE))[:, None], capsule,
                                    sphere)))
  n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
  return jnp.einsum("pij,pj->pi", rot, n)


def render(scene: scene_lib.Scene, data: mjx.Data, cameras: Sequence[str] = ("front",),
           height: int = 64, width: int = 64) -> dict[str, jax.Array]:
  """RGB, depth and segmentation of `cameras` (see the module docstring for shapes)."""
  m, mm = scene.model, scene.mjx_model
  supported = {int(mujoco.mjtGeom.mjGEOM_PLANE), int(mujoco.mjtGeom.mjGEOM_BOX),
               int(mujoco.mjtGeom.mjGEOM_CAPSULE), int(mujoco.mjtGeom.mjGEOM_SPHERE)}
  bad = sorted({int(t) for t in m.geom_type} - supported)
  if bad:
    raise ValueError(f"render: geom types {bad} have no shading normal here; the scene may only "
                     f"use planes, boxes, capsules and spheres")
  for c in cameras:
    if c not in scene.camera_ids:
      raise ValueError(f"camera {c!r} is not in the scene; use some of {tuple(scene.camera_ids)}")
  # Positions after the last physics step: mjx.step leaves xpos/geom_xpos at the pre-step qpos.
  d = mjx.kinematics(mm, data)
  rgb_table = jnp.asarray(scene.geom_rgb)
  outs = {"rgb": [], "depth": [], "seg": []}
  for c in cameras:
    cam = scene.camera_ids[c]
    local = camera_rays(m, cam, height, width)
    pos, rot = _camera_pose(m, d, cam)
    dirs = local @ rot.T                                   # [P, 3] world directions
    dist, geom = jax.vmap(lambda v: mjx.ray(mm, d, pos, v))(dirs)
    hit = geom >= 0
    point = pos + dirs * dist[:, None]
    normal = _normals(mm, d, geom, point, m.geom_type)
    # Two-sided Lambert: a ray sees the face turned towards it.
    normal = jnp.where((jnp.sum(normal * dirs, -1) > 0)[:, None], -normal, normal)
    shade = AMBIENT + (1 - AMBIENT) * jnp.maximum(0.0, normal @ jnp.asarray(_LIGHT))
    color = rgb_table[jnp.maximum(geom, 0)] * shade[:, None]
    color = jnp.where(hit[:, None], color, 0.0)
    outs["rgb"].append(jnp.clip(jnp.round(color * 255), 0, 255).astype(jnp.uint8)
                       .reshape(height, width, 3))
    # local[:, 2] = -cos(angle to the optical axis): distance -> depth along the axis.
    outs["depth"].append(jnp.where(hit, dist * -local[:, 2], 0.0).reshape(height, width))
    outs["seg"].append(jnp.where(hit, geom, -1).astype(jnp.int32).reshape(height, width))
  return {k: jnp.stack(v) for k, v in outs.items()}
