"""Config errors found before any heavy work: bad short arguments, a mesh or batch size that does not fit the
devices, missing input paths, a workdir that is a file. In-process through `validate_config` / `parse_arg`,
and through `python -m m2vla_jax.train`, which must print them as one `error:` line and exit 1.

Runs on the 8 emulated CPU devices of support.py (the subprocesses get the same count)."""
import os
import subprocess
import sys

import jax
import pytest

from m2vla_jax.training import config_base
from m2vla_jax.training import trainer
from m2vla_jax.training import validation
import support



def _load(name: str, arg: str = ""):
  return config_base.load_config_file(str(support.REPO / "configs" / f"{name}.py")).get_config(arg or None)


def _debug(arg: str = "", **overrides):
  c = _load("debug", arg)
  support.set_fields(c, overrides)
  return c


def test_devices_are_emulated():
  assert jax.device_count() == 8  # every divisibility case below assumes conftest's 8 devices


# ---- short arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arg,match", [
    ("stepz=3", r"unknown config argument 'stepz' \(did you mean 'steps'\?\); known: batch, data, "),
    ("steps=abc", r"config argument steps='abc' must be an int, e.g. steps=20"),
    ("steps", r"config argument 'steps' is not key=value"),
    ("model=big", r"config argument model='big': use model=toy or model=m2vla"),
])
def test_bad_short_argument_is_a_config_error(arg, match):
  with pytest.raises(config_base.ConfigError, match=match):
    _load("debug", arg)


def test_parse_arg_types_bools_and_floats():
  with pytest.raises(config_base.ConfigError, match=r"mol='maybe' must be a bool"):
    config_base.parse_arg("mol=maybe", mol=True)
  with pytest.raises(config_base.ConfigError, match=r"lr='fast' must be a float"):
    config_base.parse_arg("lr=fast", lr=1e-3)
  ok = config_base.parse_arg("mol=false,lr=0.5", mol=True, lr=1e-3)
  assert ok.mol is False and ok.lr == 0.5


# ---- mesh and batch against the devices ----------------------------------------------------------------

def test_batch_not_divisible_by_data_parallel_devices():
  # data=-1 takes all 8 devices: 6 examples cannot split over them.
  with pytest.raises(trainer.ConfigError, match=r"config.batch_size: 6 is not divisible by the 8 "
                     r"data-parallel devices .*--config.batch_size=8"):
    validation.validate_config(_debug("batch=6"))
  # fsdp=2 x data=4 is still 8 data-parallel devices (FSDP shards hold distinct examples).
  with pytest.raises(trainer.ConfigError, match=r"config.batch_size: 12 .* 8 data-parallel devices "
                     r"\(mesh data=4 x fsdp=2"):
    validation.validate_config(_debug("batch=12,fsdp=2"))
  # A model axis takes devices away from data parallelism: data=4, model=2 -> 4-way; 12 splits.
  validation.validate_config(_debug("batch=12", **{"mesh.model": 2}))
  validation.validate_config(_debug("batch=8,fsdp=2"))


@pytest.mark.parametrize("mesh,match", [
    ({"fsdp": 3}, r"config.mesh.fsdp: 3 does not divide the 8 devices; use one of \[1, 2, 4, 8\]"),
    ({"model": 16}, r"config.mesh.model: 16 does not divide the 8 devices"),
    ({"data": 2, "fsdp": 2}, r"config.mesh: data=2, fsdp=2, model=1 takes 4 devices, have 8; set one axis to -1"),
    ({"fsdp": -1}, r"config.mesh: at most one axis may be -1"),
    ({"fsdp": 0}, r"config.mesh.fsdp: must be a positive device count or -1"),
])
def test_mesh_that_does_not_fit_the_devices(mesh, match):
  with pytest.raises(trainer.ConfigError, match=match):
    validation.validate_config(_debug(**{f"mesh.{k}": v for k, v in mesh.items()}))


# ---- input paths and workdir -------------------------------------------------------------------------

def _oxe(tmp_path, **paths):
  """configs/oxe.py with its three required paths set to existing files / folder, then `paths` over them."""
  (tmp_path / "pg.npz").write_bytes(b"")
  (tmp_path / "tok.model").write_bytes(b"")
  (tmp_path / "oxe").mkdir(exist_ok=True)
  c = _load("oxe", "batch=64")
  c.init.checkpoint = str(tmp_path / "pg.npz")
  c.data.tokenizer = str(tmp_path / "tok.model")
  c.data.pipeline.data_dir = str(tmp_path / "oxe")
  support.set_fields(c, paths)
  return c


@pytest.mark.parametrize("field,value,match", [
    ("init.checkpoint", "missing.npz", r"config.init.checkpoint: '.*missing.npz' does not exist; fix the path "
                                       r"\(--config.init.checkpoint=...\)"),
    ("data.tokenizer", "missing.model", r"config.data.tokenizer: '.*missing.model' does not exist"),
    ("data.pipeline.data_dir", "missing_dir", r"config.data.pipeline.data_dir: '.*missing_dir' does not exist"),
    ("data.pipeline.data_dir", "pg.npz", r"config.data.pipeline.data_dir: '.*pg.npz' is a file, not a directory"),
    ("init.checkpoint", "oxe", r"config.init.checkpoint: '.*oxe' is a directory"),
])
def test_required_input_path_does_not_exist(tmp_path, field, value, match):
  validation.validate_config(_oxe(tmp_path), check_paths=True)  # all present: accepted
  with pytest.raises(trainer.ConfigError, match=match):
    validation.validate_config(_oxe(tmp_path, **{field: str(tmp_path / value)}), check_paths=True)


def test_input_paths_are_checked_only_when_asked_and_only_locally(tmp_path):
  # A workflow creates its data_dir after validation (sim configs), so the default does not look.
  validation.validate_config(_oxe(tmp_path, **{"init.checkpoint": str(tmp_path / "later.npz")}))
  # Remote inputs are left to their readers (checking needs credentials).
  validation.validate_config(_oxe(tmp_path, **{"data.pipeline.data_dir": "gs://bucket/oxe"}), check_paths=True)
  # Named tokenizers are not paths.
  validation.validate_config(_debug("data=rlds", **{"data.pipeline.data_dir": str(tmp_path)}), check_paths=True)


def test_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "run"
  f.write_text("")
  with pytest.raises(trainer.ConfigError, match=r"--workdir='.*run' is a file, not a directory"):
    validation.validate_config(_debug(), workdir=str(f))
  with pytest.raises(trainer.ConfigError, match=r"--workdir='.*run/sub' is under the file '.*run'"):
    validation.validate_config(_debug(), workdir=str(f / "sub"))
  validation.validate_config(_debug(), workdir=str(tmp_path / "new" / "run"))  # creatable: accepted


# ---- the entry point: one line, exit status 1, no traceback, before any work ---------------------------

@pytest.mark.parametrize("config_arg,expected", [
    ("configs/debug.py:stepz=3", "unknown config argument 'stepz'"),
    ("configs/debug.py:steps=abc", "config argument steps='abc' must be an int"),
    ("configs/debug.py:batch=6", "config.batch_size: 6 is not divisible by the 8 data-parallel devices"),
    ("configs/debug.py:fsdp=3", "config.mesh.fsdp: 3 does not divide the 8 devices"),
])
def test_entry_point_prints_one_line(tmp_path, config_arg, expected):
  workdir = tmp_path / "w"
  _assert_one_line_error([f"--config={config_arg}", f"--workdir={workdir}"], expected)
  assert not workdir.exists()  # failed before train() made the run directory


def test_entry_point_workdir_is_a_file(tmp_path):
  (tmp_path / "w").write_text("")
  _assert_one_line_error(["--config=configs/debug.py", f"--workdir={tmp_path / 'w'}"], "--workdir=")


def _assert_one_line_error(args, expected):
  env = dict(os.environ, XLA_FLAGS=support.xla_flags_with_devices(8), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(support.REPO), TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run([sys.executable, "-m", "m2vla_jax.train", *args], cwd=support.REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 1, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  assert expected in lines[0], lines[0]
