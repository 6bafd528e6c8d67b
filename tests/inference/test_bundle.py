"""Export bundles: params + MSM memory + statistics round-trip, and `load_policy` returns unnormalized actions."""
import itertools

import jax
import numpy as np
import pytest

from m2vla_jax import inference
from m2vla_jax.core import freezing
from m2vla_jax.training import trainer
import support


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(support.debug_config(support.ARG6, **{"checkpoint.every": 3}), str(workdir))
  return workdir


def _direct_actions(workdir, obs):
  """Reference: the policy applied to the restored checkpoint, without the bundle."""
  config, s, state, _ = inference.restore.restore_run(str(workdir))
  params = freezing.merge(state.trainable, state.frozen)
  return np.asarray(jax.jit(s.policy.sample_actions)(params, state.policy_state, obs, jax.random.PRNGKey(0)))


def test_bundle_round_trip_and_unnormalized_actions(run, tmp_path):
  out = inference.export(str(run), str(tmp_path / "bundle"))
  for name in ("params.npz", "state.npz", "config.json", "statistics.json", "batch_spec.json"):
    assert (tmp_path / "bundle" / name).exists(), name
  policy = inference.load_policy(out)
  memory = policy.state["msm"]
  assert memory["valid"].sum() == 6 * 8  # 6 steps x 8 frames written into the 64-slot FIFO
  obs = next(itertools.islice(trainer.build_data(support.debug_config(support.ARG6), "val"), 0, None))["observation"]
  normalized = _direct_actions(run, obs)
  np.testing.assert_allclose(policy.normalized_actions(obs), normalized, rtol=0, atol=1e-6)
  # Toy statistics: q01 = -2, q99 = 2 ('bounds'), last dim a gripper (passed through unnormalized).
  expected = normalized.astype(np.float64).copy()
  expected[..., :-1] *= 2.0
  np.testing.assert_allclose(policy(obs), expected, rtol=1e-6, atol=1e-6)


def test_bf16_bundle(run, tmp_path):
  policy32 = inference.load_policy(inference.export(str(run), str(tmp_path / "f32")))
  policy16 = inference.load_policy(inference.export(str(run), str(tmp_path / "bf16"), dtype="bfloat16"))
  leaves = jax.tree_util.tree_leaves(policy16.params)
  assert all(x.dtype == jax.numpy.bfloat16 for x in leaves if np.issubdtype(x.dtype, np.floating) or
             x.dtype == jax.numpy.bfloat16)
  obs = next(trainer.build_data(support.debug_config(support.ARG6), "val"))["observation"]
  a32, a16 = policy32(obs), policy16(obs)
  assert np.abs(a32 - a16).max() < 0.1 and not np.array_equal(a32, a16)


def test_export_without_checkpoint_fails(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    inference.export(str(tmp_path / "empty"), str(tmp_path / "out"))


def test_restore_refuses_frozen_weights_that_changed_since_training(run, monkeypatch):
  # Frozen weights are rebuilt from the config, not saved; a changed pretrained file or init must not
  # silently pair with the trained head. Simulated: the rebuilt frozen weights come out scaled.
  setup = trainer.setup

  def changed_setup(*args, **kwargs):
    s = setup(*args, **kwargs)
    key = sorted(s.state.frozen)[0]
    frozen = dict(s.state.frozen, **{key: s.state.frozen[key] * 1.5 + 0.1})
    s.state = s.state.replace(frozen=frozen)
    return s

  inference.restore.restore_run(str(run))        # unchanged: restores
  monkeypatch.setattr(trainer, "setup", changed_setup)
  with pytest.raises(ValueError, match="frozen weights rebuilt from the run's config differ"):
    inference.restore.restore_run(str(run))


def test_frozen_fingerprint_tolerates_last_bit_differences():
  rng = np.random.default_rng(0)
  a = {"w": rng.normal(size=(64, 64)).astype(np.float32)}
  nudged = {"w": np.nextafter(a["w"], np.float32(np.inf))}   # one ulp: another CPU's init
  assert freezing.fingerprint_mismatches(freezing.fingerprint(a), freezing.fingerprint(nudged)) == []
  other = {"w": a["w"] * 1.01}
  assert freezing.fingerprint_mismatches(freezing.fingerprint(a), freezing.fingerprint(other)) == ["w"]
  assert freezing.fingerprint_mismatches(freezing.fingerprint(a), {}) == ["w"]
