"""Visual shifts change what the camera sees and nothing else: images differ from the unshifted scene,
the simulator state and its response to the same actions stay identical (float64, exact: only model
fields that physics never reads are edited)."""
import numpy as np
import pytest

from m2vla_jax.sim.metaworld import env as metaworld_env
from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld
from m2vla_jax.sim.metaworld import visual_shift

TASK = "drawer-close-v3"


def _rollout(kind):
  cfg = metaworld_env.EnvConfig(image_size=32, wrist_camera=None, max_episode_steps=20, visual_shift=kind)
  env = metaworld_env.make_env(TASK, cfg)
  try:
    obs = env.reset(seed=3)
    images, states = [obs["images"][0]], [obs["privileged"]]
    for a in np.random.default_rng(0).uniform(-1, 1, (5, 4)):
      obs, *_ = env.step(a)
      images.append(obs["images"][0])
      states.append(obs["privileged"])
  finally:
    env.close()
  return np.stack(images).astype(np.float64), np.stack(states)


@pytest.fixture(scope="module")
def unshifted():
  return _rollout(None)


@pytest.mark.parametrize("kind", ["camera", "lighting", "colors"])
def test_shift_changes_images_not_physics(unshifted, kind):
  images, states = _rollout(kind)
  ref_images, ref_states = unshifted
  np.testing.assert_array_equal(states, ref_states)
  # Mean absolute pixel change (0-255) of the whole frame: well above rendering noise (0 here).
  change = np.abs(images - ref_images).mean()
  assert change > 3.0, (kind, change)


def test_unknown_shift_names_the_field():
  with pytest.raises(ValueError, match="EnvConfig.visual_shift='fog'"):
    metaworld_env.EnvConfig(visual_shift="fog")
  with pytest.raises(ValueError, match="variant='shift_fog' is unknown"):
    evaluate_metaworld.evaluate_variants(lambda obs: None, "mt10", evaluate_metaworld.EvalConfig(),
                                         variants=["shift_fog"])
  assert set(evaluate_metaworld.SHIFT_VARIANTS) == {f"shift_{k}" for k in visual_shift.KINDS}


def test_camera_shift_moves_the_camera_by_the_stated_amount():
  import mujoco
  from metaworld import env_dict
  env = env_dict.ALL_V3_ENVIRONMENTS[TASK]()
  model = env.model
  cam = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner")
  pos, quat = model.cam_pos[cam].copy(), model.cam_quat[cam].copy()
  shift = visual_shift.VisualShift("camera")
  visual_shift.apply(model, shift, "corner")
  np.testing.assert_allclose(np.linalg.norm(model.cam_pos[cam] - pos), shift.camera_offset_m, rtol=1e-9)
  # Angle between the old and new orientation: two 4-degree turns about perpendicular axes.
  dot = abs(float(np.dot(quat, model.cam_quat[cam])))
  angle = np.rad2deg(2 * np.arccos(min(dot, 1.0)))
  assert 4.0 < angle < 8.0, angle
  env.close()
