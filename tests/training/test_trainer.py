"""Trainer behaviour on 8 emulated CPU devices: learning with FSDP, exact resume after SIGKILL, SIGTERM,
corrupted checkpoints, NaN losses, config errors. The toy policy keeps every run to a few seconds."""
import itertools
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from m2vla_jax.core import tree_util
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import train_state
from m2vla_jax.training import trainer
from m2vla_jax.training import validation
import support

def _restore(workdir, arg, step=None):
  """(state, data_state) of a run's checkpoint, restored against a fresh setup of the same config."""
  c = support.debug_config(arg)
  data = trainer.build_data(c, "train")
  s = trainer.setup(c, next(data))
  ck = ckpt_lib.Checkpointer(str(pathlib.Path(workdir) / "checkpoints"), keep=None)
  if step is not None:
    out = ck._restore_step(step, trainer.abstract_for_restore(s))  # pylint: disable=protected-access
  else:
    out = ck.restore_latest(trainer.abstract_for_restore(s))
  ck.close()
  return out[0], out[1]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 6-step run, checkpoints at 2, 4, 6."""
  workdir = tmp_path_factory.mktemp("ref")
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 2, "checkpoint.keep": None})
  result = trainer.train(c, str(workdir))
  return workdir, result


def test_debug_config_learns_with_fsdp(tmp_path):
  assert len(jax.devices()) == 8
  c = support.debug_config("steps=4,fsdp=2,batch=8", **{"checkpoint.every": 4})
  s = trainer.setup(c, next(trainer.build_data(c, "train")))
  assert dict(s.mesh.shape) == {"data": 4, "fsdp": 2, "model": 1}
  # fsdp_min_bytes=0: every parameter with an axis divisible by 2 is sharded over 'fsdp'.
  specs = {k: v.spec for k, v in s.shardings.trainable.items()}
  assert any("fsdp" in str(spec) for spec in specs.values()), specs
  assert s.shardings.policy_state["msm"]["keys"].spec[0] == ("data", "fsdp")
  assert s.state.policy_state["msm"]["keys"].sharding.spec[0] == ("data", "fsdp")
  # Frozen backbone in bf16, no optimizer state for it.
  assert all(k.startswith("vlm/") for k in s.state.frozen)
  assert all(v.dtype == jax.numpy.bfloat16 for v in s.state.frozen.values())
  assert not any(k.startswith("vlm/") for k in s.state.trainable)
  snapshots = []

  def evaluate(snapshot):
    snapshots.append(snapshot)
    return {"num_params": len(tree_util.flatten(snapshot.params))}

  with pytest.raises(trainer.ConfigError, match="every >= 1"):
    trainer.train(c, str(tmp_path), (trainer.Evaluator("offline", 0, evaluate),))
  result = trainer.train(c, str(tmp_path), (trainer.Evaluator("offline", 3, evaluate),))
  assert [st for st, _ in result["history"]] == [1, 2, 3, 4]
  # An evaluator runs every `every` steps and at the last one, on host copies of the params then.
  assert [snap.step for snap in snapshots] == [3, 4]
  assert [st for st, _ in result["evaluations"]] == [3, 4]
  assert result["evaluations"][0][1]["offline/num_params"] == len(s.state.trainable) + len(s.state.frozen)
  assert snapshots[0].statistics and snapshots[0].policy is not None
  # Batches differ from step to step, so compare the loss on the same held-out batches before and after.
  eval_step = jax.jit(train_state.make_eval_step(s.policy))
  val = [trainer.sharding_lib.host_to_global(b, s.mesh) for b in
         itertools.islice(trainer.build_data(c, "val"), 2)]
  trained, _ = _restore(tmp_path, "steps=4,fsdp=2,batch=8")
  before = np.mean([float(eval_step(s.state, b)["loss"]) for b in val])
  after = np.mean([float(eval_step(trained, b)["loss"]) for b in val])
  assert after < 0.9 * before, (before, after)
  assert (tmp_path / "tensorboard").exists() and (tmp_path / "config.json").exists()
  last = tree_util.flatten(snapshots[1].params)
  for path, value in trained.trainable.items():
    np.testing.assert_array_equal(last[path], np.asarray(value), err_msg=path)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path, reference_run):
  ref_dir, _ = reference_run
  cmd, env = support.train_cli(tmp_path, f"--config={support.DEBUG}:{support.ARG6}", "--config.checkpoint.every=1",
                  "--config.checkpoint.keep=10", "--config.data.slow_after_batch=3",
                  "--config.data.slow_seconds=600")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  # The 4th batch (index 3) blocks, so the process sits after step 3 until it is killed.
  deadline = time.time() + 240
  while not (tmp_path / "checkpoints" / "3").exists():
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.5)
  time.sleep(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 2})
  result = trainer.train(c, str(tmp_path))
  assert result["history"][0][0] == 4 and result["step"] == 6
  resumed, data_state = _restore(tmp_path, support.ARG6)
  reference, ref_data_state = _restore(ref_dir, support.ARG6)
  assert int(resumed.step) == 6 and data_state == ref_data_state == {"index": 6}
  support.assert_bitwise_equal(resumed, reference)


@pytest.mark.slow
def test_sigterm_saves_last_finished_step_and_exits_zero(tmp_path):
  cmd, env = support.train_cli(tmp_path, f"--config={support.DEBUG}:steps=200,fsdp=2,batch=8", "--config.checkpoint.every=2",
                  "--config.data.slow_after_batch=2", "--config.data.slow_seconds=0.5")
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 240
  while not (tmp_path / "checkpoints" / "2").exists():
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  assert "preempted=True" in out, out[-3000:]
  last = int(out.split("last_checkpoint=")[1].split()[0])
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == last and 2 <= last < 200
  state, data_state = _restore(tmp_path, "steps=200,fsdp=2,batch=8")
  assert int(state.step) == last and data_state == {"index": last}


def test_corrupted_latest_checkpoint_falls_back(tmp_path, reference_run, capsys):
  ref_dir, _ = reference_run
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 2, "checkpoint.keep": 2, "total_steps": 4})
  trainer.train(c, str(tmp_path))
  ckdir = tmp_path / "checkpoints"
  assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [2, 4]
  # Truncate the array data files of the newest checkpoint (a copy cut short). Which OCDBT data file
  # holds which arrays is orbax's business (some hold superseded nodes), so cut them all.
  files = [p for p in (ckdir / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for victim in files:
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  capsys.readouterr()
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 2, "checkpoint.keep": 2})
  result = trainer.train(c, str(tmp_path))
  out = capsys.readouterr().out
  assert "checkpoint step 4 is corrupt" in out, out
  assert result["history"][0][0] == 3 and result["step"] == 6
  # Step 2 (older than the bad one) was not deleted by keep=2 while training 3..6: it is only deleted once
  # two newer good checkpoints (4, 6) exist; the bad one is preserved outside the manager's directory.
  assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [4, 6]
  assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["4"]
  resumed, _ = _restore(tmp_path, support.ARG6)
  reference, _ = _restore(ref_dir, support.ARG6)
  support.assert_bitwise_equal(resumed, reference)


@pytest.mark.slow
def test_corrupted_latest_keeps_older_when_nothing_new_is_saved(tmp_path):
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 1, "checkpoint.keep": 3, "total_steps": 3})
  trainer.train(c, str(tmp_path))
  ckdir = tmp_path / "checkpoints"
  (ckdir / "3" / "state" / "_METADATA").write_text("{")
  (ckdir / "2" / "state" / "_METADATA").write_text("")
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 100, "checkpoint.keep": 2, "total_steps": 2})
  result = trainer.train(c, str(tmp_path))
  # 3 and 2 are bad: resume from 1, train step 2 and save it (final step); nothing good was deleted.
  assert result["history"] == [(2, pytest.approx(result["loss"]))]
  assert sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()) == ["2", "3"]
  assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [1, 2]


def test_nan_loss_stops_naming_step_and_keeps_last_good(tmp_path):
  c = support.debug_config(support.ARG6, **{"checkpoint.every": 2, "data.nan_at_batch": 4, "total_steps": 10})
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step 5 .*Last good checkpoint: 4"):
    trainer.train(c, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  state, _ = _restore(tmp_path, support.ARG6)
  assert int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state.trainable))


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="unknown config argument 'stepz'"):
    support.debug_config("stepz=3")
  with pytest.raises(trainer.ConfigError, match=r"config.batch_size: 10 is not divisible by .*grad_accum"):
    validation.validate_config(support.debug_config(**{"batch_size": 10, "grad_accum_steps": 4}))
  with pytest.raises(trainer.ConfigError, match=r"config.model.trainable\[0\]"):
    validation.validate_config(support.debug_config(**{"model.trainable": [("vlm/.*", "no"), (".*", True)]}))
  stale = support.debug_config()
  with stale.unlocked():
    stale.trainable = [(".*", True)]   # the old trainer-level field
  with pytest.raises(trainer.ConfigError, match=r"config.trainable: is a policy fact now"):
    validation.validate_config(stale)
  with pytest.raises(trainer.ConfigError, match=r"config.policy='nope'"):
    validation.validate_config(support.debug_config(**{"policy": "nope"}))
  with pytest.raises(trainer.ConfigError, match=r"config.optimizer.lr: must be >= 0"):
    validation.validate_config(support.debug_config(**{"optimizer.lr": -1.0}))


@pytest.mark.parametrize("override,expected", [
    ("--config.optimizer.lrr=0.1", "config.optimizer.lrr"),        # unknown key
    ("--config.batch_size=lots", "config.batch_size"),             # ill-typed value
    ("--config.checkpoint.every=0", "config.checkpoint.every: must be >= 1"),  # out of range
])
def test_cli_rejects_bad_config_before_work(tmp_path, override, expected):
  cmd, env = support.train_cli(tmp_path / "w", f"--config={support.DEBUG}", override)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert expected in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "w").exists()
