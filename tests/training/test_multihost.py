"""Multi-host training for real, on one machine: 2 processes x 4 CPU devices over loopback.

The code path a TPU pod runs (jax.distributed.initialize, per-process data rows, global batch
assembly from process-local data, checkpoints written by several processes, preemption agreed
between processes) against the same run as 1 process x 8 devices. The toy data draws the same
global batch on every host and keeps its rows, so both runs see identical batches; only the order
in which the gradient all-reduce adds the 8 per-device sums differs (gloo across processes).
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import support
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import trainer

ARG = "steps=8,fsdp=2,batch=16"
COMMON = ("--config.progress_bar=False", "--config.eval_every=0", "--config.log_every=1",
          "--config.checkpoint.keep=20")

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, extra: dict | None = None) -> dict:
  # Every run compiles the same few programs: they share test_train's persistent compilation cache.
  env = dict(os.environ, XLA_FLAGS=support.xla_flags_with_devices(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(support.REPO), JAX_COMPILATION_CACHE_DIR=support.CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(k, None)
  env.update(extra or {})
  return env


def _cmd(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "m2vla_jax.train", f"--config={support.DEBUG}:{ARG}", f"--workdir={workdir}",
          *COMMON, *extra]


def _start_two(workdir, *extra) -> list[subprocess.Popen]:
  port = _free_port()
  return [subprocess.Popen(
      _cmd(workdir, *extra),
      env=_env(4, {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                   "JAX_PROCESS_ID": str(i)}),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]


def _finish(procs, timeout=300) -> list[str]:
  outs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def _wait_for_checkpoint(procs, workdir, step: int, timeout: float = 240) -> None:
  """Until `step` is saved under workdir; fails (with the output) if a process exits first."""
  deadline = time.time() + timeout
  while not (pathlib.Path(workdir) / "checkpoints" / str(step)).exists():
    for p in procs:
      assert p.poll() is None, p.stdout.read().decode()[-4000:]
    assert time.time() < deadline, f"no checkpoint {step} within {timeout} s"
    time.sleep(0.2)


def _losses(workdir) -> dict[int, float]:
  """step -> train loss from the run's TensorBoard event files (written by process 0)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for f in sorted((pathlib.Path(workdir) / "tensorboard").rglob("events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(str(f)):
      for v in event.summary.value:
        if v.tag == "train/loss":
          out[event.step] = v.simple_value
  assert out, f"no train loss in {workdir}/tensorboard"
  return out


def _restore(workdir):
  """The newest checkpoint of a run, restored in this (1-process, 8-device) test process."""
  c = support.debug_config(ARG)
  s = trainer.setup(c, next(trainer.build_data(c, "train")))
  ck = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"), keep=None)
  state, data_state, _ = ck.restore_latest(trainer.abstract_for_restore(s))
  ck.close()
  return state, data_state


def _leaves(state):
  return {name: [np.asarray(x) for x in jax.tree_util.tree_leaves(getattr(state, name))]
          for name in ("trainable", "opt_state", "policy_state")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one")
  proc = subprocess.run(_cmd(workdir, "--config.checkpoint.every=4", "--distributed=no"),
                        env=_env(8), capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stdout.decode()[-4000:] + proc.stderr.decode()[-4000:]
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("two")
  _finish(_start_two(workdir, "--config.checkpoint.every=4"))
  return workdir


def test_two_processes_train_like_one(one_process, two_processes):
  one, two = _losses(one_process), _losses(two_processes)
  assert sorted(one) == sorted(two) == list(range(1, 9))
  # Same batches, same program per device; only the all-reduce adds the per-device gradient sums in
  # another order, a few float32 ulps per step that Adam carries forward: 1e-5 relative on the loss
  # and 1e-5 absolute on parameters of magnitude ~1 (a wrong batch row or a missing host's gradient
  # changes the loss in the second decimal).
  np.testing.assert_allclose([two[k] for k in sorted(two)], [one[k] for k in sorted(one)], rtol=1e-5)
  (s1, d1), (s2, d2) = _restore(one_process), _restore(two_processes)
  assert int(s1.step) == int(s2.step) == 8 and d1 == d2 == {"index": 8}
  l1, l2 = _leaves(s1), _leaves(s2)
  for name in l1:
    assert len(l1[name]) == len(l2[name]) > 0, name
    for a, b in zip(l1[name], l2[name]):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)


def test_sigkill_both_mid_run_resumes_to_the_same_result(two_processes, tmp_path):
  # Batch 5 (index 5) blocks, so both processes sit after step 5 until they are killed.
  procs = _start_two(tmp_path, "--config.checkpoint.every=1", "--config.data.slow_after_batch=5",
                     "--config.data.slow_seconds=600")
  _wait_for_checkpoint(procs, tmp_path, 5)
  time.sleep(1.0)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.wait()
  outs = _finish(_start_two(tmp_path, "--config.checkpoint.every=4"))
  assert all("done: step=8" in out for out in outs), [o[-2000:] for o in outs]
  # Same machine, same two-process program before and after the kill: resume is exact.
  (resumed, d_r), (reference, d_ref) = _restore(tmp_path), _restore(two_processes)
  assert d_r == d_ref == {"index": 8}
  lr, lref = _leaves(resumed), _leaves(reference)
  for name in lr:
    for a, b in zip(lr[name], lref[name]):
      assert a.tobytes() == b.tobytes(), f"{name} differs after resume"


def test_sigterm_to_one_process_saves_and_both_exit_cleanly(tmp_path):
  procs = _start_two(tmp_path, "--config.total_steps=400", "--config.checkpoint.every=2",
                     "--config.data.slow_after_batch=2", "--config.data.slow_seconds=0.5")
  _wait_for_checkpoint(procs, tmp_path, 2)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs, timeout=180)
  lasts = []
  for out in outs:
    assert "preempted=True" in out, out[-3000:]
    lasts.append(int(out.split("last_checkpoint=")[1].split()[0]))
  assert lasts[0] == lasts[1] and 2 <= lasts[0] < 400, lasts
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == lasts[0]
