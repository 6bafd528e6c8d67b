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

from m2vla_jax.policies import m2vla  # noqa: E402
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


class _EchoPolicy:
  """sample_actions returns the normalized state it was given, tiled over the chunk (and records
  the observation), so the wrapper's transforms can be checked against numpy."""

  class config:  # pylint: disable=invalid-name
    state_dim = 6

  def sample_actions(self, params, state, observation, rng):
    del params, state, rng
    self.seen = observation
    s = observation["state"][:, :4]
    return jnp.repeat(s[:, None], 3, axis=1)


def test_trained_policy_applies_the_pipelines_normalization():
  from m2vla_jax.data import statistics as stats_lib
  from m2vla_jax.sim.mjx import policy as policy_lib
  from m2vla_jax.text import tokenizers
  rs = np.random.default_rng(0)
  q01 = rs.uniform(-1, 0, 4)
  q99 = q01 + rs.uniform(0.5, 2, 4)
  stats = {"state": {"mean": (q01 + q99) / 2, "std": np.ones(4), "q01": q01, "q99": q99,
                     "min": q01 - 0.1, "max": q99 + 0.1},
           "action": {"mean": np.zeros(4), "std": np.ones(4), "q01": q01 / 2, "q99": q99 / 2,
                      "min": q01 / 2 - 0.1, "max": q99 / 2 + 0.1},
           "action_gripper_mask": [False] * 4}
  echo = _EchoPolicy()
  trained = policy_lib.TrainedPolicy(echo, None, {}, {"normalization": "bounds",
                                                      "datasets": {"demos": stats}},
                                     tokenizer="bytes_mod:128", max_tokens=32, image_size=32)
  raw = rs.uniform(-1.5, 1.5, (5, 4)).astype(np.float32)
  obs = {"images": np.zeros((5, 1, 32, 32, 3), np.uint8), "image_mask": np.ones((5, 1), bool),
         "state": raw, "tokens": np.zeros((5, 32), np.int32),
         "token_mask": np.zeros((5, 32), bool), "privileged": np.zeros((5, 18), np.float32)}
  out = np.asarray(trained.policy_fn(trained.params, obs, jax.random.key(0)))
  # reference: the data pipeline's own normalizer in float64
  ref_state = stats_lib.apply_normalizer(raw.astype(np.float64),
                                         stats_lib.normalizer(stats, "state", "bounds"))
  np.testing.assert_allclose(np.asarray(echo.seen["state"][:, :4]), ref_state, atol=1e-6)
  assert np.all(np.asarray(echo.seen["state"][:, 4:]) == 0)    # zero-padded to state_dim
  assert "privileged" not in echo.seen
  # actions: the inverse of the pipeline's action normalizer, then clipped to the action space
  a_norm = stats_lib.normalizer(stats, "action", "bounds")
  ref_actions = np.clip((ref_state.astype(np.float64) - a_norm[1]) / a_norm[0], -1, 1)
  np.testing.assert_allclose(out, np.repeat(ref_actions[:, None], 3, 1), atol=1e-5)
  inside = np.abs(ref_actions) < 1 - 1e-3
  renorm = stats_lib.apply_normalizer(out[:, 0].astype(np.float64), a_norm)
  np.testing.assert_allclose(renorm[inside], ref_state[inside], atol=1e-5)
  # tokens: what the training pipeline's Tokenize makes of the instruction
  text = "pick up the blue block and set it down on the white target"
  tokens, mask = tokenizers.Tokenize(tokenizers.make_tokenizer("bytes_mod:128"), 32)(text)
  assert trained.tokenizer(text) == [int(t) for t in tokens[mask]]
  env = trained.env_params(("pick_lift", "place_on_target"), "table", 2)
  got, got_mask = env.tokenize([text])
  np.testing.assert_array_equal(got[0], tokens)
  np.testing.assert_array_equal(got_mask[0], mask)
  # 32 byte tokens keep pick_lift and place_on_target instructions apart (16 would not)
  assert trained.tokenizer("pick up the blue block") != trained.tokenizer(text)
  with pytest.raises(ValueError, match="trained on 32px"):
    trained.policy_fn(trained.params, {**obs, "images": np.zeros((5, 1, 16, 16, 3), np.uint8)},
                      jax.random.key(0))
  other = {**stats, "action": {**stats["action"], "q99": stats["action"]["q99"] * 2}}
  with pytest.raises(ValueError, match="pass dataset="):
    policy_lib.TrainedPolicy(echo, None, {}, {"datasets": {"a": stats, "b": other}},
                             tokenizer="bytes_mod:128", max_tokens=32, image_size=32)
  # one set shared by every dataset of the mixture (pipeline shared_statistics): no choice to make
  shared = policy_lib.TrainedPolicy(echo, None, {}, {"datasets": {"a": stats, "b": stats}},
                                    tokenizer="bytes_mod:128", max_tokens=32, image_size=32)
  assert shared.dataset == "a"
