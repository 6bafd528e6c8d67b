"""Bad export bundles fail in `load_policy` with a `BundleError` naming the file and the key, not at the first
call: missing or truncated files, a missing / mis-shaped / mis-typed parameter or state array, statistics
that do not fit the config. One real bundle (the toy policy, as in tests/inference/test_bundle.py) is made per module and
each test corrupts a copy of it."""
import json
import shutil

import numpy as np
import pytest

from m2vla_jax import inference
from m2vla_jax.core import tree_util
from m2vla_jax.training import trainer
from m2vla_jax.weights import npz
import support

PARAM = "head/out/kernel"   # the toy policy's output layer: [hidden, horizon * action_dim]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(support.debug_config(support.ARG6, **{"total_steps": 2, "checkpoint.every": 2}), str(workdir))
  return inference.export(str(workdir), str(tmp_path_factory.mktemp("bundle") / "b"))


@pytest.fixture
def copy(bundle, tmp_path):
  out = tmp_path / "bundle"
  shutil.copytree(bundle, out)
  return out


def _truncate(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])


def _rewrite_npz(path, prefix, edit):
  flat = tree_util.flatten(tree_util.unflatten(
      {k[len(prefix):]: v for k, v in npz.read_npz(str(path)).items()}))
  edit(flat)
  npz.save_npz(str(path), tree_util.unflatten(flat), prefix=prefix)


def test_intact_copy_loads(copy):
  policy = inference.load_policy(str(copy))   # the corruptions below are the only difference
  assert PARAM in tree_util.flatten(policy.params)


@pytest.mark.parametrize("name", ["params.npz", "state.npz"])
@pytest.mark.parametrize("keep", [0.0, 0.5, 0.99])
def test_truncated_npz_names_the_file(copy, name, keep):
  _truncate(copy / name, keep)
  with pytest.raises(inference.BundleError, match=rf"bundle file .*/{name} is truncated or corrupt .*re-export"):
    inference.load_policy(str(copy))


@pytest.mark.parametrize("name", ["config.json", "statistics.json", "batch_spec.json"])
def test_truncated_json_names_the_file(copy, name):
  _truncate(copy / name)
  with pytest.raises(inference.BundleError, match=rf"bundle file .*/{name} is truncated or corrupt "
                     r"\(JSONDecodeError"):
    inference.load_policy(str(copy))


def test_missing_file_names_it(copy):
  (copy / "state.npz").unlink()
  with pytest.raises(inference.BundleError, match=r"bundle file .*/state.npz does not exist"):
    inference.load_policy(str(copy))


def test_missing_parameter_is_reported_at_load(copy):
  _rewrite_npz(copy / "params.npz", "params/", lambda flat: flat.pop(PARAM))
  with pytest.raises(inference.BundleError,
                     match=rf"params.npz lacks 1 parameter\(s\) .*'{PARAM}' \(64, 28\) float32"):
    inference.load_policy(str(copy))


def test_unexpected_parameter_is_reported(copy):
  _rewrite_npz(copy / "params.npz", "params/",
               lambda flat: flat.update({"head/extra": np.zeros(3, np.float32)}))
  with pytest.raises(inference.BundleError,
                     match=r"params.npz holds parameter\(s\) .* does not have: \['head/extra'\]"):
    inference.load_policy(str(copy))


def test_misshaped_parameter_names_key_and_shapes(copy):
  def edit(flat):
    flat[PARAM] = flat[PARAM][:, :-1]
  _rewrite_npz(copy / "params.npz", "params/", edit)
  with pytest.raises(inference.BundleError, match=rf"params.npz: parameter '{PARAM}' has shape \(64, 27\), the model "
                     r"of config.json expects \(64, 28\)"):
    inference.load_policy(str(copy))


def test_wrong_dtype(copy):
  def edit(flat):
    flat["msm/ids"] = flat["msm/ids"].astype(np.float32)
  _rewrite_npz(copy / "state.npz", "state/", edit)
  with pytest.raises(inference.BundleError,
                     match=r"state.npz: state array 'msm/ids' has dtype float32, .* expects int32"):
    inference.load_policy(str(copy))


def test_bfloat16_parameters_are_accepted(copy):
  # `export --dtype=bfloat16` and config.frozen_dtype store floats narrower than the init's float32.
  import ml_dtypes
  _rewrite_npz(copy / "params.npz", "params/",
               lambda flat: flat.update({k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}))
  inference.load_policy(str(copy))


def test_misshaped_state_array(copy):
  def edit(flat):
    flat["msm/values"] = flat["msm/values"][:32]
  _rewrite_npz(copy / "state.npz", "state/", edit)
  with pytest.raises(inference.BundleError, match=r"state.npz: state array 'msm/values' has shape \(32, 4, 7\)"):
    inference.load_policy(str(copy))


def _edit_stats(copy, edit):
  path = copy / "statistics.json"
  stats = json.loads(path.read_text())
  edit(stats)
  path.write_text(json.dumps(stats))


@pytest.mark.parametrize("edit,match", [
    # 8 action dims for a model with 7: the broadcast error the first call used to give.
    (lambda s: [s["datasets"]["synthetic"]["action"][f].append(0.0) for f in s["datasets"]["synthetic"]["action"]],
     r"datasets/synthetic/action has 8 dims, more than config.json's model.action_dim=7"),
    (lambda s: s["datasets"]["synthetic"]["state"]["q99"].pop(),
     r"datasets/synthetic/state fields have different lengths"),
    (lambda s: s.update(action_dim=6), r"action_dim=6 but config.json's model.action_dim=7"),
    (lambda s: s["datasets"]["synthetic"]["action_gripper_mask"].pop(),
     r"datasets/synthetic/action_gripper_mask has 6 entries, the action statistics 7"),
    (lambda s: s["datasets"]["synthetic"]["action"].pop("q01"), r"datasets/synthetic/action lacks some of"),
    (lambda s: s.update(normalization="minmax"), r"normalization='minmax' is not one of"),
    (lambda s: s.update(datasets={}), r"has no per-dataset statistics"),
])
def test_statistics_inconsistent_with_config(copy, edit, match):
  _edit_stats(copy, edit)
  with pytest.raises(inference.BundleError, match=r"bundle file .*/statistics.json.*" + match):
    inference.load_policy(str(copy))
