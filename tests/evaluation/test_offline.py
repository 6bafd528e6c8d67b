"""Offline evaluation: per-dataset L1/MSE, per-dim errors and gripper accuracy against a numpy float64
reference; plots written; the real bridge sample through the RLDS pipeline end to end."""
import json
import os

import numpy as np
import pytest

from m2vla_jax import evaluate
from m2vla_jax import inference
from m2vla_jax.data import testing as data_testing
from m2vla_jax.training import trainer
import support


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(support.debug_config(support.ARG6, **{"checkpoint.every": 6}), str(workdir))
  return inference.export(str(workdir), str(tmp_path_factory.mktemp("bundle")))


def test_metrics_match_numpy_reference(bundle, tmp_path):
  policy = inference.load_policy(bundle)
  result = evaluate.evaluate(policy, max_batches=3, out=str(tmp_path))
  m = result["datasets"]["synthetic"]
  # Reference: the same 3 held-out batches, unnormalized by hand (q01=-2, q99=2 -> x2; gripper as is).
  preds, trues = [], []
  for batch in list(trainer.build_data(policy.config, "val"))[:3]:
    p = policy.normalized_actions(batch["observation"], None).astype(np.float64)
    t = batch["actions"].astype(np.float64)
    p[..., :-1] *= 2
    t[..., :-1] *= 2
    preds.append(p)
    trues.append(t)
  p, t = np.concatenate(preds), np.concatenate(trues)
  err = p - t
  assert m["num_frames"] == 24 and m["num_steps"] == 24 * 4
  np.testing.assert_allclose(m["l1"], np.abs(err).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["mse"], (err ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["l1_per_dim"], np.abs(err).mean((0, 1)), rtol=1e-5)
  np.testing.assert_allclose(m["gripper_accuracy"], ((p[..., -1] > 0) == (t[..., -1] > 0)).mean(), rtol=1e-9)
  assert json.loads((tmp_path / "metrics.json").read_text())["datasets"]["synthetic"]["l1"] == m["l1"]
  assert (tmp_path / "trajectories_synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(data_testing.shared_data_dir() is None, reason="shared bridge sample not present")
def test_bridge_sample_end_to_end(tmp_path):
  data_dir = os.path.join(data_testing.shared_data_dir(), "octo_bridge_debug")
  c = support.debug_config(f"steps=2,fsdp=2,batch=8,data=rlds,data_dir={data_dir}", **{"checkpoint.every": 2})
  trainer.train(c, str(tmp_path / "run"))
  result = evaluate.evaluate(evaluate.load(str(tmp_path / "run")), out=str(tmp_path / "eval"))
  m = result["datasets"]["bridge_dataset"]
  assert m["num_frames"] == 250  # the whole val split (25 episodes x 10 steps), last partial batch kept
  assert len(m["l1_per_dim"]) == 7 and all(np.isfinite(m["l1_per_dim"]))
  assert 0.0 <= m["gripper_accuracy"] <= 1.0
  assert (tmp_path / "eval" / "trajectories_bridge_dataset.png").exists()


def test_split_train_needs_max_batches_and_reads_the_training_stream(bundle):
  policy = inference.load_policy(bundle)
  with pytest.raises(ValueError, match="split='train' repeats forever: give max_batches"):
    evaluate.evaluate(policy, split="train")
  with pytest.raises(ValueError, match="split='test'; use 'val'"):
    evaluate.evaluate(policy, split="test", max_batches=1)
  train = evaluate.evaluate(policy, split="train", max_batches=2)
  val = evaluate.evaluate(policy, split="val", max_batches=2)
  assert train["num_batches"] == val["num_batches"] == 2
  # The synthetic source draws the two splits from disjoint streams: other frames, other errors.
  assert train["datasets"]["synthetic"] != val["datasets"]["synthetic"]
