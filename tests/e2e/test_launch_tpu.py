"""launch_tpu.sh --dry-run: every gcloud command printed (create, copy, install, train on all workers),
nothing executed; bad flags refused."""
import os
import shlex
import subprocess
import support

REPO = support.REPO


def _run(tmp_path, *args):
  # A gcloud on PATH that records any call: a dry run must never invoke it.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/gcloud_calls\nexit 1\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  return subprocess.run(["bash", str(REPO / "launch_tpu.sh"), *args], env=env, capture_output=True,
                        text=True, timeout=60)


def _commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_all_commands(tmp_path):
  out = _run(tmp_path, "--dry-run", "--name=m2vla-test", "--zone=us-east5-a", "--accelerator=v5p-64",
             "--version=v2-alpha-tpuv5", "--project=proj", "--config=configs/oxe.py:steps=9",
             "--workdir=gs://bucket/run 1", "--spot", "--", "--config.batch_size=1024",
             "--config.model.checkpoint=gs://b/pg.npz")
  assert out.returncode == 0, out.stderr
  assert not (tmp_path / "gcloud_calls").exists()
  create, scp, install, start = _commands(out.stdout)
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "m2vla-test"
  for flag in ("--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
               "--version=v2-alpha-tpuv5", "--spot"):
    assert flag in create, (flag, create)
  assert scp[4] == "scp" and "--worker=all" in scp
  assert "m2vla-test:~/m2vla_jax" in scp and str(REPO) in scp
  assert install[4] == "ssh" and "--worker=all" in install
  install_cmd = next(a for a in install if a.startswith("--command="))
  assert "pip install -q -e ." in install_cmd and "jax[tpu]==0.10.2" in install_cmd
  assert start[4] == "ssh" and "--worker=all" in start
  # Unwrap: ssh --command -> tmux new-session ... <train command> -> the python argv.
  tmux = shlex.split(next(a for a in start if a.startswith("--command="))[len("--command="):])
  train = shlex.split(tmux[-1])
  i = train.index("python")
  assert train[i:i + 3] == ["python", "-m", "m2vla_jax.train"]
  assert "--config=configs/oxe.py:steps=9" in train and "--workdir=gs://bucket/run 1" in train
  assert "--config.batch_size=1024" in train and "--config.model.checkpoint=gs://b/pg.npz" in train


def test_bad_arguments_are_refused(tmp_path):
  out = _run(tmp_path, "--dry-run", "--workdir=/local/dir")
  assert out.returncode == 2 and "gs://" in out.stderr
  out = _run(tmp_path, "--dry-run")
  assert out.returncode == 2 and "--workdir is required" in out.stderr
  out = _run(tmp_path, "--dry-run", "--workdir=gs://b/r", "--acelerator=v4-8")
  assert out.returncode == 2 and "unknown argument '--acelerator=v4-8'" in out.stderr
  out = _run(tmp_path, "--dry-run", "--workdir=gs://b/r", "--name=Bad_Name")
  assert out.returncode == 2 and "--name" in out.stderr
  assert not (tmp_path / "gcloud_calls").exists()
