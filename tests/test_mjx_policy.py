"""A tiny M²-VLA's `sample_actions` as the policy inside the compiled MJX rollout.

Reference: the same policy called eagerly (outside the rollout) on the observation the rollout
recorded, with the rng the rollout derives for its first policy call, must give the actions the
rollout executed: the compiled loop hands the policy exactly the rendered images, proprio and
instruction tokens of the batch contract (float32, tolerance 1e-4 for a different XLA fusion).
"""
import os

# Before the first `import mujoco` of the process: it picks its OpenGL backend at import, and
# the render tests (and Meta-World's) need EGL.
os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.models import m2vla  # noqa: E402
from m2vla_jax.sim.mjx import rollout as rl  # noqa: E402

N_ENVS, HORIZON, CHUNK = 2, 8, 4
ENV = rl.EnvParams(tasks=("pick_lift", "push_to_target"), execute_steps=CHUNK, image_size=32,
                   record=True, max_tokens=16)
CONTRACT = ("images", "image_mask", "state", "tokens", "token_mask")


def _policy():
  return m2vla.M2VLA(dict(vlm="tiny", num_cameras=1, state_dim=4, horizon=CHUNK, action_dim=4,
                          frozen_dtype="float32", msm=False,
                          head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_blocks=2)))


@pytest.mark.slow
def test_tiny_m2vla_drives_the_compiled_rollout():
  policy = _policy()
  tokens, mask = ENV.tokenize(["lift the red block"] * 2)
  example = {"images": np.zeros((2, 1, 32, 32, 3), np.uint8), "image_mask": np.ones((2, 1), bool),
             "state": np.zeros((2, 4), np.float32), "tokens": tokens, "token_mask": mask}
  params, state = jax.jit(policy.init)(jax.random.key(0), example)

  def policy_fn(p, obs, rng):
    return jnp.tanh(policy.sample_actions(p, state, {k: obs[k] for k in CONTRACT}, rng))

  rng = jax.random.key(7)
  out = rl.rollout(policy_fn, params, ENV, rng, N_ENVS, HORIZON)
  assert out["actions"].shape == (HORIZON, N_ENVS, 4)
  assert np.isfinite(out["actions"]).all() and not out["nonfinite"].any()
  assert out["frames"].shape == (HORIZON // CHUNK, N_ENVS, 1, 32, 32, 3)

  tokens, mask = ENV.tokenize(out["instructions"])
  obs = {"images": out["frames"][0], "image_mask": np.ones((N_ENVS, 1), bool),
         "state": out["states"][0], "tokens": tokens, "token_mask": mask}
  _, k_policy = jax.random.split(rng)
  ref = np.asarray(policy_fn(params, obs, jax.random.fold_in(k_policy, 0)))
  np.testing.assert_allclose(out["actions"][:CHUNK], ref.transpose(1, 0, 2), atol=1e-4)
  # the second chunk was planned from a later observation: the hand moved, so it differs
  assert np.abs(out["states"][1] - out["states"][0]).max() > 1e-4
