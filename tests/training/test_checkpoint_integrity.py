"""Checkpoint integrity: flipped bytes, non-finite values and unreadable steps are caught on restore and the
previous step restores instead; checkpoints written before checksums existed still restore.

The states saved here are the debug config's real TrainState (sharded over 8 emulated CPU devices) with every
float array refilled with random bit patterns: values of random magnitude are incompressible, so orbax
stores their bytes verbatim and a test can find an array's data inside the OCDBT data files and flip a
byte in it (orbax's business where it writes them; the tests search, and fail if they find nothing).
OCDBT keeps chunks of up to 1 KiB inline in its b-tree nodes, which carry a CRC-32C that tensorstore checks;
larger chunks are stored bare, and those are where a flipped byte went unnoticed. So the arrays flipped
here have chunks over 1 KiB (the MSM memory is enlarged to 512 slots for that), and each test shows the flip
restoring silently through orbax before showing that the checkpointer catches it.
"""
import builtins
import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import trainer
import support

# pylint: disable=protected-access
_state_item, _files_under, _array_report = ckpt_lib._state_item, ckpt_lib._files_under, ckpt_lib._array_report
# pylint: enable=protected-access
FLOAT_GROUPS = ("trainable", "opt_state", "policy_state")
MEMORY = {"model.memory_size": 512}  # 8 KiB per shard of the MSM keys: stored outside OCDBT's b-tree


@pytest.fixture(scope="module")
def setup():
  c = support.debug_config(support.ARG6, **MEMORY)
  return trainer.setup(c, next(trainer.build_data(c, "train")))


def _random_state(state, step, seed, nan_at=None):
  """`state` at `step` with every float array of FLOAT_GROUPS refilled with random finite bit patterns
  (magnitudes 1e-9..1e9); `nan_at`: an array path whose first element becomes NaN."""
  rng = np.random.default_rng(seed)

  def fill(group, path, x):
    if not np.issubdtype(x.dtype, np.floating):
      return x
    bits = rng.integers(0, 2**32, size=x.shape, dtype=np.uint32) & np.uint32(0x807FFFFF)
    bits |= rng.integers(97, 157, size=x.shape, dtype=np.uint32) << np.uint32(23)
    value = bits.view(np.float32).astype(x.dtype)
    if f"{group}/{_name(path)}" == nan_at:
      value.reshape(-1)[0] = np.nan
    return jax.device_put(value, x.sharding)

  groups = {g: jax.tree_util.tree_map_with_path(lambda p, x, g=g: fill(g, p, x), getattr(state, g))
            for g in FLOAT_GROUPS}
  if nan_at is not None:
    assert any(not np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(groups)), nan_at
  return state.replace(step=jax.device_put(np.int32(step), state.step.sharding), **groups)


def _name(path):
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _leaves(tree):
  """{array path as in the checksums: leaf}."""
  return {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _arrays(state):
  """{array path: np.ndarray} of the saved part of a state."""
  return {k: np.asarray(x) for k, x in _leaves(_state_item(state)).items()}


def _assert_same_arrays(a, b):
  # Restoring is byte-exact I/O with no arithmetic: anything but bitwise equality is a wrong value.
  a, b = _arrays(a), _arrays(b)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def _save(directory, states, keep=None):
  ck = ckpt_lib.Checkpointer(str(directory), keep=keep)
  for state in states:
    ck.save(state, {"index": int(state.step)}, {"note": "test"})
  ck.close()


def _restore_latest(directory, setup, keep=None):
  ck = ckpt_lib.Checkpointer(str(directory), keep=keep)
  try:
    out = ck.restore_latest(trainer.abstract_for_restore(setup))
    return out, ck.all_steps()
  finally:
    ck.close()


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory):
  """Steps 1 and 2 of random states, saved once; tests corrupt copies of it."""
  states = {step: _random_state(setup.state, step, seed=step) for step in (1, 2)}
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  _save(directory, states.values())
  return directory, states


@pytest.fixture
def ckdir(saved, tmp_path):
  directory = tmp_path / "checkpoints"
  shutil.copytree(saved[0], directory)
  return directory


def _data_files(step_dir):
  """OCDBT data files of a step (local or gs://)."""
  return [p for p in _files_under(epath.Path(step_dir) / "state") if p.parent.name == "d"]


def _relative_files(directory):
  directory = epath.Path(directory)
  return sorted(str(p.relative_to(directory)) for p in _files_under(directory))


def _flip_first_byte(window: bytes, files) -> int:
  """Flips the lowest bit of the first byte of every occurrence of `window` in `files`; returns how many."""
  flipped = 0
  for path in files:
    blob = bytearray(path.read_bytes())
    start = blob.find(window)
    while start >= 0:
      blob[start] ^= 0x01
      flipped += 1
      start = blob.find(window, start + 1)
    if bytes(blob) != path.read_bytes():
      path.write_bytes(bytes(blob))
      assert path.read_bytes() == bytes(blob)
  return flipped


@pytest.mark.parametrize("array", ["trainable/head/block_1/kernel", "opt_state/1/0/nu/head/block_0/kernel",
                                   "policy_state/msm/keys"])
def test_flipped_byte_is_caught_and_previous_step_restores(setup, saved, ckdir, array, capsys):
  _, states = saved
  leaf = _arrays(states[2])[array]
  shard = _leaves(_state_item(states[2]))[array].addressable_shards[0]
  # The first 32 bytes of one shard's data (8 random float32s: no chance match elsewhere); flipping the
  # lowest bit of its first byte changes the low mantissa bit of one element, which stays finite, so only
  # the checksum can notice.
  window = np.asarray(shard.data).tobytes()[:32]
  flipped = _flip_first_byte(window, _data_files(ckdir / "2"))
  assert flipped, f"the bytes of {array} were not found verbatim in any OCDBT data file"

  # Orbax alone restores the flip silently: one element differs and everything is finite.
  with ocp.StandardCheckpointer() as orbax_ckptr:
    raw = orbax_ckptr.restore(ckdir / "2" / "state", _state_item(trainer.abstract_for_restore(setup)))
  got = np.asarray(_leaves(raw)[array])
  assert np.isfinite(got).all() and np.count_nonzero(got != leaf) == 1

  capsys.readouterr()
  (state, data_state, assets), steps = _restore_latest(ckdir, setup)
  out = capsys.readouterr().out
  assert "checkpoint step 2 is corrupt" in out and f"array {array} fails its checksum" in out, out
  assert int(state.step) == 1 and data_state == {"index": 1} and assets == {"note": "test"}
  _assert_same_arrays(state, states[1])
  # The bad step was moved, not deleted: whole, under checkpoints_corrupt/.
  assert steps == [1]
  quarantined = list((ckdir.parent / "checkpoints_corrupt").iterdir())
  assert [p.name.split("-")[0] for p in quarantined] == ["2"]
  assert _relative_files(quarantined[0]) == _relative_files(saved[0] / "2")  # the copy's source


def test_non_finite_value_is_caught(setup, tmp_path, capsys):
  states = [_random_state(setup.state, 1, seed=1),
            _random_state(setup.state, 2, seed=2, nan_at="policy_state/msm/values")]
  _save(tmp_path / "checkpoints", states)
  capsys.readouterr()
  (state, _, _), steps = _restore_latest(tmp_path / "checkpoints", setup)
  out = capsys.readouterr().out
  assert "checkpoint step 2 is corrupt" in out and "array policy_state/msm/values holds non-finite" in out, out
  assert int(state.step) == 1 and steps == [1]
  _assert_same_arrays(state, states[0])


def _save_old_format(directory, states):
  """What Checkpointer.save wrote before checksums existed (state, data and assets items only)."""
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "assets": ocp.JsonCheckpointHandler()}
  mgr = ocp.CheckpointManager(epath.Path(directory), options=ocp.CheckpointManagerOptions(create=True),
                              item_handlers=handlers)
  for state in states:
    mgr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_state_item(state)),
        data=ocp.args.JsonSave({"index": int(state.step)}), assets=ocp.args.JsonSave({"note": "old"})))
  mgr.wait_until_finished()
  mgr.close()


def test_checkpoint_without_checksums_restores_unverified(setup, tmp_path, capsys):
  ckdir = tmp_path / "checkpoints"
  good = _random_state(setup.state, 1, seed=1)
  # The newest old-format step holds a NaN: finiteness is still checked without checksums.
  _save_old_format(ckdir, [good, _random_state(setup.state, 2, seed=2, nan_at="trainable/head/out/bias")])
  assert not (ckdir / "1" / "checksums").exists()
  capsys.readouterr()
  (state, data_state, assets), steps = _restore_latest(ckdir, setup)
  out = capsys.readouterr().out
  assert out.count("predates checkpoint checksums") == 1, out  # once, not once per step tried
  assert "checkpoint step 2 is corrupt" in out and "array trainable/head/out/bias holds non-finite" in out, out
  assert int(state.step) == 1 and data_state == {"index": 1} and assets == {"note": "old"} and steps == [1]
  _assert_same_arrays(state, good)


def _deny_access(monkeypatch, victim: pathlib.Path, allow_rename_in_place: bool):
  """Python-level file access as for a directory with mode 000 owned by someone else or by us.

  Listing it, or opening anything inside, fails with EACCES; moving it under another parent fails too
  (that rewrites its '..' entry, which needs write permission on it); renaming it within its parent works
  only when `allow_rename_in_place` (it does for our own directory, not for a read-only parent).
  """
  victim = os.path.abspath(victim)
  real_listdir, real_scandir, real_open, real_rename = os.listdir, os.scandir, builtins.open, os.rename

  def denied(path):
    if isinstance(path, int):
      return False
    path = os.path.abspath(os.fsdecode(path))
    return path == victim or path.startswith(victim + os.sep)

  def fail(path):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

  def listdir(path="."):
    return fail(path) if denied(path) else real_listdir(path)

  def scandir(path="."):
    return fail(path) if denied(path) else real_scandir(path)

  def open_(file, *args, **kwargs):
    return fail(file) if denied(file) else real_open(file, *args, **kwargs)

  def rename(src, dst, *args, **kwargs):
    if denied(src):
      same_parent = os.path.dirname(os.path.abspath(dst)) == os.path.dirname(victim)
      if not (same_parent and allow_rename_in_place and os.path.abspath(src) == victim):
        fail(src)
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "listdir", listdir)
  monkeypatch.setattr(os, "scandir", scandir)
  monkeypatch.setattr(builtins, "open", open_)
  monkeypatch.setattr(os, "rename", rename)


def test_unreadable_newest_step_is_renamed_aside(setup, saved, ckdir, monkeypatch, capsys):
  _, states = saved
  files_before = _relative_files(ckdir / "2")
  _deny_access(monkeypatch, ckdir / "2", allow_rename_in_place=True)
  capsys.readouterr()
  (state, _, _), steps = _restore_latest(ckdir, setup)
  out = capsys.readouterr().out
  monkeypatch.undo()
  assert "checkpoint step 2 is unreadable (PermissionError" in out, out
  assert int(state.step) == 1 and steps == [1]
  _assert_same_arrays(state, states[1])
  # checkpoints_corrupt/ was out of reach, so it was renamed next to the steps, under a non-step name.
  (aside,) = [p for p in ckdir.iterdir() if p.name.endswith(".corrupt")]
  assert aside.name.startswith("2-") and not (ckdir / "2").exists()
  assert _relative_files(aside) == files_before


def test_unmovable_unreadable_step_is_skipped_and_never_deleted(setup, saved, ckdir, monkeypatch, capsys):
  _, states = saved
  files_before = _relative_files(ckdir / "2")
  _deny_access(monkeypatch, ckdir / "2", allow_rename_in_place=False)
  ck = ckpt_lib.Checkpointer(str(ckdir), keep=1)
  capsys.readouterr()
  state, _, _ = ck.restore_latest(trainer.abstract_for_restore(setup))
  out = capsys.readouterr().out
  assert "checkpoint step 2 is unreadable" in out and "could not be moved" in out, out
  assert int(state.step) == 1 and ck.all_steps() == [1]
  _assert_same_arrays(state, states[1])
  # Training on: step 2 cannot be written over the bad one, and keep=1 must not delete anything while the
  # bad step (newest on disk) would count among the kept ones.
  ck.save(states[2], {"index": 2}, {})
  assert "not saving checkpoint step 2" in capsys.readouterr().out
  ck.save(_random_state(setup.state, 3, seed=3), {"index": 3}, {})
  ck.close()
  monkeypatch.undo()
  assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2", "3"]
  assert _relative_files(ckdir / "2") == files_before


_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import support
from m2vla_jax.training import checkpoints as ckpt_lib, trainer
c = support.debug_config(support.ARG6, **{memory!r})
s = trainer.setup(c, next(trainer.build_data(c, "train")))
ck = ckpt_lib.Checkpointer({ckdir!r}, keep=None)
state, data_state, _ = ck.restore_latest(trainer.abstract_for_restore(s))
print("RESULT", json.dumps({{"step": int(state.step), "steps": ck.all_steps()}}))
ck.close()
"""


def _unshare_works() -> bool:
  try:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-U", "true"], capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    return False


def test_unreadable_newest_step_with_real_permissions(setup, saved, ckdir, capsys):
  """chmod 000 for real. As root, permissions do not apply, so the restore runs in a child process in a
  user namespace of its own (`unshare -U`), where the files' owner is unmapped and the mode bits bind."""
  _, states = saved
  (ckdir / "2").chmod(0)
  try:
    if not os.access(ckdir / "2", os.R_OK):
      capsys.readouterr()
      (state, _, _), steps = _restore_latest(ckdir, setup)
      out = capsys.readouterr().out
      got_step = int(state.step)
      _assert_same_arrays(state, states[1])
    elif _unshare_works():
      env = dict(os.environ, XLA_FLAGS=support.xla_flags_with_devices(8), JAX_PLATFORMS="cpu",
                 PYTHONPATH=str(support.REPO))
      code = _CHILD.format(tests=str(support.REPO / "tests"), ckdir=str(ckdir), memory=MEMORY)
      proc = subprocess.run(["unshare", "-U", sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=300)
      out = proc.stdout
      assert proc.returncode == 0, (out + proc.stderr)[-3000:]
      result = json.loads(out.split("RESULT ")[1])
      got_step, steps = result["step"], result["steps"]
    else:
      pytest.skip("running as root without user namespaces: chmod 000 cannot make a directory unreadable")
    assert "checkpoint step 2 is unreadable (PermissionError" in out, out
    assert got_step == 1 and steps == [1]
    (aside,) = [p for p in ckdir.iterdir() if p.name.endswith(".corrupt")]
  finally:
    for path in [ckdir / "2", *ckdir.glob("*.corrupt"), *ckdir.parent.glob("checkpoints_corrupt/*")]:
      if path.exists():
        path.chmod(0o755)
  assert _relative_files(aside) == _relative_files(saved[0] / "2")


def test_digest_ignores_sharding_and_sees_every_element():
  """The digest is the same however an array is sharded; changing any one element of any dtype changes it."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
  rng = np.random.default_rng(0)
  arrays = {"f32": rng.standard_normal((8, 6)).astype(np.float32),
            "bf16": rng.standard_normal((8, 6)).astype(jax.numpy.bfloat16),
            "i8": rng.integers(-128, 128, (8, 6)).astype(np.int8),
            "u32": rng.integers(0, 2**32, (8, 6), dtype=np.uint32),
            "bool": rng.integers(0, 2, (8, 6)).astype(bool)}
  sharded = jax.device_put(arrays, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
  single = jax.device_put(arrays, jax.devices()[0])
  assert _array_report(sharded) == _array_report(single)
  base = _array_report(arrays)
  for name, x in arrays.items():
    for index in [(0, 0), (3, 4), (7, 5)]:
      changed = x.copy()
      changed[index] = ~x[index] if x.dtype == bool else x[index] + x.dtype.type(1)
      # Swapping two elements keeps the multiset of values: only the index weighting sees it.
      swapped = x.copy()
      swapped[0, 0], swapped[7, 5] = x[7, 5], x[0, 0]
      for other in (changed, swapped):
        if other.tobytes() != x.tobytes():
          assert _array_report({name: other})[name]["digest"] != base[name]["digest"], (name, index)


def test_flipped_byte_on_gcs_is_caught(setup, saved, gcs, capsys):  # pylint: disable=redefined-outer-name
  """The same on gs:// (the emulator of tests/training/test_gcs.py): checksums item, verification, quarantine."""
  _, states = saved
  ckdir = epath.Path(f"gs://{support.GCS_BUCKET}/integrity/checkpoints")
  _save(ckdir, states.values())
  array = "policy_state/msm/values"
  shard = _leaves(_state_item(states[2]))[array].addressable_shards[0]
  assert _flip_first_byte(np.asarray(shard.data).tobytes()[:32], _data_files(ckdir / "2"))
  files_before = _relative_files(ckdir / "2")
  capsys.readouterr()
  (state, _, _), steps = _restore_latest(ckdir, setup)
  out = capsys.readouterr().out
  assert "checkpoint step 2 is corrupt" in out and f"array {array} fails its checksum" in out, out
  assert int(state.step) == 1 and steps == [1]
  _assert_same_arrays(state, states[1])
  quarantined = list((ckdir.parent / "checkpoints_corrupt").iterdir())
  assert [p.name.split("-")[0] for p in quarantined] == ["2"]
  assert _relative_files(quarantined[0]) == files_before
