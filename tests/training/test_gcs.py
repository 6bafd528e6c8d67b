"""gs:// for checkpoints, resume, corrupt-checkpoint fallback and export bundles, against a GCS emulator.

The emulator (tests/gcs_emulator.py: gcp-storage-emulator with its GCS deviations fixed) is a real HTTP
server on a loopback port in its own process; tensorstore (orbax arrays) and gcsfs (etils.epath) talk to it
through the same code paths they use for storage.googleapis.com. The references are local-disk runs of the
same config, which tests/training/test_trainer.py and tests/inference/test_bundle.py check on their own.
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from etils import epath
import jax
import numpy as np
import pytest

from m2vla_jax import inference
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import trainer
import support

BUCKET = support.GCS_BUCKET   # the conftest `gcs` fixture's


def _restore(workdir, step=None):
  """(state, data_state) of a run's checkpoint (local or gs://), restored against a fresh setup."""
  c = support.debug_config(support.ARG6)
  s = trainer.setup(c, next(trainer.build_data(c, "train")))
  ck = ckpt_lib.Checkpointer(str(epath.Path(workdir) / "checkpoints"), keep=None)
  try:
    if step is None:
      out = ck.restore_latest(trainer.abstract_for_restore(s))
    else:
      out = ck._restore_step(step, trainer.abstract_for_restore(s))  # pylint: disable=protected-access
  finally:
    ck.close()
  return out[0], out[1]


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
  """An uninterrupted 6-step run on local disk, checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("local_ref")
  trainer.train(support.debug_config(support.ARG6, **{"checkpoint.every": 2, "checkpoint.keep": None}), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def gcs_run(gcs):
  """A gs:// run trained to step 3 by the CLI, SIGKILLed, then resumed to 6 in this (fresh) process."""
  workdir = f"gs://{BUCKET}/run"
  cmd, env = support.train_cli(workdir, f"--config={support.DEBUG}:{support.ARG6}", "--config.checkpoint.every=1",
                  "--config.checkpoint.keep=10", "--config.data.slow_after_batch=3",
                  "--config.data.slow_seconds=600")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    # The 4th batch blocks, so the process sits after step 3 until it is killed. On GCS orbax finalises a
    # step by writing its commit_success.txt last (there is no directory rename).
    deadline = time.time() + 240
    while gcs.object("run/checkpoints/3/commit_success.txt") is None:
      assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
      assert time.time() < deadline
      time.sleep(0.5)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  ck = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", keep=None)
  steps_after_kill = ck.all_steps()
  ck.close()
  result = trainer.train(support.debug_config(support.ARG6, **{"checkpoint.every": 2}), workdir)
  return workdir, steps_after_kill, result


def test_emulator_serves_generations_and_preconditions(gcs):
  """The fixture behaves like GCS where tensorstore depends on it (see tests/gcs_emulator.py)."""
  base = f"http://127.0.0.1:{gcs.port}"

  def request(method, path, data=None):
    req = urllib.request.Request(base + path, data=data, method=method)
    try:
      with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
      return e.code, dict(e.headers), e.read()

  upload = f"/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=pre%2Fx"
  status, _, body = request("POST", upload + "&ifGenerationMatch=0", b"one")
  assert status == 200
  gen = json.loads(body)["generation"]
  assert int(gen) > 0
  assert request("POST", upload + "&ifGenerationMatch=0", b"two")[0] == 412  # exists: not overwritten
  media = f"/storage/v1/b/{BUCKET}/o/pre%2Fx?alt=media"
  status, headers, body = request("GET", media)
  assert (status, body) == (200, b"one")
  assert {k.lower(): v for k, v in headers.items()}["x-goog-generation"] == gen
  assert request("GET", media + f"&ifGenerationNotMatch={gen}")[0] == 304
  assert request("GET", media + f"&ifGenerationMatch={int(gen) + 1}")[0] == 412
  assert request("DELETE", f"/storage/v1/b/{BUCKET}/o/pre%2Fx?ifGenerationMatch={int(gen) + 1}")[0] == 412
  status, _, body = request("POST", upload + f"&ifGenerationMatch={gen}", b"three")
  assert status == 200 and int(json.loads(body)["generation"]) > int(gen)


@pytest.mark.slow
def test_checkpoints_on_gcs_resume_exactly_after_sigkill(gcs, gcs_run, local_reference):
  workdir, steps_after_kill, result = gcs_run
  assert steps_after_kill == [1, 2, 3]
  assert result["history"][0][0] == 4 and result["step"] == 6
  # The OCDBT array store and the run's other files really are objects in the emulator's bucket.
  assert gcs.object("run/checkpoints/6/state/manifest.ocdbt") is not None
  assert gcs.object("run/config.json") is not None
  assert any(p.name.startswith("events.out.tfevents") for p in epath.Path(workdir, "tensorboard").iterdir())
  resumed, data_state = _restore(workdir)
  reference, ref_data_state = _restore(local_reference)
  assert int(resumed.step) == 6 and data_state == ref_data_state == {"index": 6}
  support.assert_bitwise_equal(resumed, reference)


def test_export_to_gcs_and_load_policy(gcs, gcs_run, local_reference, tmp_path):
  workdir = gcs_run[0]
  out = f"gs://{BUCKET}/bundle"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(support.REPO))
  proc = subprocess.run([sys.executable, "-m", "m2vla_jax.export", f"--workdir={workdir}", f"--out={out}"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("params.npz", "state.npz", "config.json", "statistics.json", "batch_spec.json"):
    assert gcs.object(f"bundle/{name}") is not None, name
  from_gcs = inference.load_policy(out)
  local = inference.load_policy(inference.export(str(local_reference), str(tmp_path / "bundle")))
  for name in ("params", "state"):
    a, b = getattr(from_gcs, name), getattr(local, name)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      assert np.asarray(x).dtype == np.asarray(y).dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
  obs = next(trainer.build_data(support.debug_config(support.ARG6), "val"))["observation"]
  actions = from_gcs(obs)
  assert actions.shape[0] == obs["state"].shape[0] and np.isfinite(actions).all()
  np.testing.assert_array_equal(actions, local(obs))  # same params, same program: bitwise equal


def test_corrupt_checkpoint_on_gcs_falls_back(gcs, local_reference, capsys):
  workdir = f"gs://{BUCKET}/corrupt"
  trainer.train(support.debug_config(support.ARG6, **{"checkpoint.every": 2, "checkpoint.keep": 2, "total_steps": 4}), workdir)
  ckdir = epath.Path(workdir) / "checkpoints"
  # Cut every OCDBT data file of the newest checkpoint in half (a copy cut short), as tests/training/test_trainer.py.
  victims = [p for p in ckpt_lib._files_under(ckdir / "4" / "state") if p.parent.name == "d"]  # pylint: disable=protected-access
  assert victims
  for victim in victims:
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
  capsys.readouterr()
  state, data_state = _restore(workdir)
  out = capsys.readouterr().out
  assert "checkpoint step 4 is corrupt" in out, out
  assert int(state.step) == 2 and data_state == {"index": 2}
  reference, _ = _restore(local_reference, step=2)
  support.assert_bitwise_equal(state, reference)
  # The bad step left the manager's directory for checkpoints_corrupt/ (copied: gs:// cannot rename
  # directories); step 2 is untouched.
  assert gcs.object("corrupt/checkpoints/4/commit_success.txt") is None
  assert gcs.object("corrupt/checkpoints/2/commit_success.txt") is not None
  quarantined = list((epath.Path(workdir) / "checkpoints_corrupt").iterdir())
  assert [p.name.split("-")[0] for p in quarantined] == ["4"]
  assert gcs.object(f"corrupt/checkpoints_corrupt/{quarantined[0].name}/commit_success.txt") is not None
