"""DAgger on the MJX tasks (sim/mjx/dagger.py): the mixed policy, expert labels, errors.

The labels of a round (beta = 1 against an independent expert rollout) are checked in
tests/sim/mjx/test_rollout.py, which compiles that expert rollout anyway.
"""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from m2vla_jax.sim.mjx import dagger  # noqa: E402
from m2vla_jax.sim.mjx import experts  # noqa: E402
from m2vla_jax.sim.mjx import rollout as rl  # noqa: E402
from m2vla_jax.sim.mjx import scene as scene_lib  # noqa: E402
from m2vla_jax.sim.mjx import workflow  # noqa: E402
import support  # noqa: E402

H = 3


def _learner(params, obs, rng):
  """A stand-in learner: constant chunk `params` [4] for every env."""
  del rng
  return jnp.broadcast_to(params, (obs["state"].shape[0], H, 4))


def _obs(n, seed=0):
  rs = np.random.default_rng(seed)
  priv = np.zeros((n, 18), np.float32)
  priv[:, :3] = rs.uniform(-0.1, 0.1, (n, 3)) + [0, 0, 0.12]
  priv[:, 3] = scene_lib.FINGER_OPEN
  priv[:, 4:13] = rs.uniform(-0.15, 0.15, (n, 9)) * ([1, 1, 0] * 3) + [0, 0, scene_lib.BLOCK_HALF] * 3
  priv[:, 16] = rs.integers(0, 3, n)
  priv[:, 17] = rs.integers(0, 3, n)
  return {"state": priv[:, :4], "privileged": priv}


def test_mixed_policy_is_expert_or_learner_per_env():
  n = 64
  obs = _obs(n)
  fn = jax.jit(dagger.mixed_policy(_learner))
  learner = jnp.array([0.5, -0.5, 0.25, 1.0])
  expert = np.asarray(jax.vmap(experts.expert_action)(obs["privileged"]))
  out1 = np.asarray(fn({"learner": learner, "beta": 1.0}, obs, jax.random.key(0)))
  np.testing.assert_allclose(out1, np.repeat(expert[:, None], H, 1), atol=1e-6)
  out0 = np.asarray(fn({"learner": learner, "beta": 0.0}, obs, jax.random.key(0)))
  np.testing.assert_allclose(out0, np.broadcast_to(learner, (n, H, 4)), atol=1e-6)
  half = np.asarray(fn({"learner": learner, "beta": 0.5}, obs, jax.random.key(1)))
  is_expert = np.all(np.isclose(half, np.repeat(expert[:, None], H, 1)), axis=(1, 2))
  is_learner = np.all(np.isclose(half, np.asarray(learner)), axis=(1, 2))
  assert np.all(is_expert | is_learner)
  assert 16 <= is_expert.sum() <= 48          # binomial(64, 0.5): ~4 sigma


def test_errors_and_the_workflow_accepts_only_its_own_rounds():
  env = rl.EnvParams(tasks=("pick_lift",), execute_steps=2, image_size=16, record=True)
  with pytest.raises(ValueError, match="needs EnvParams\\(execute_steps=1, record=True\\)"):
    dagger.collect(_learner, jnp.zeros(4), env, jax.random.key(0), 1, 2, beta=0.5)
  with pytest.raises(ValueError, match="beta=1.5 must be in \\[0, 1\\]"):
    dagger.collect(_learner, jnp.zeros(4), env, jax.random.key(0), 1, 2, beta=1.5)
  from m2vla_jax.training import config_base
  c = config_base.load_config_file(os.path.join(str(support.CONFIGS),
                                                "mjx.py")).get_config("dagger=1")
  assert c.mjx.dagger.rounds == 1 and 0 <= c.mjx.dagger.beta <= 1
  c.unlock()
  c.data.pipeline.datasets = f"{c.mjx.dataset_name},{dagger.round_name(c.mjx.dataset_name, 1)}_x"
  workflow._check(c)  # pylint: disable=protected-access
  c.data.pipeline.datasets = f"{c.mjx.dataset_name},bridge"
  with pytest.raises(ValueError, match="then only its DAgger rounds"):
    workflow._check(c)  # pylint: disable=protected-access
