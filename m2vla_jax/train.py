"""Training entry point: `python -m m2vla_jax.train --config=configs/debug.py --workdir=/tmp/run`.

The one entry point for every config's workflow: plain training, or, for a config with a simulator
section, that simulator's whole run (`sim`: Meta-World demonstrations -> train -> closed-loop
report; `mjx`: MJX demonstrations -> grounding pretraining -> train -> compiled and C-MuJoCo rollouts;
`libero`: LIBERO scripted demonstrations -> train -> closed loop on held-out init states).

Overrides: `--config.batch_size=256`, `--config.optimizer.lr=3e-4`. The config is locked, so an unknown
key fails in flag parsing and an ill-typed value fails ConfigDict's type check; `validate_config` then
checks ranges, required fields, the mesh against the devices, the global batch against the data-parallel
devices, the input paths and the workdir, all before any data loading or model init. A config mistake (a
bad short argument such as `configs/sim.py:stepz=3`, an unknown override key, a `ConfigError` or `DataError`
from validation) is printed as one line, `error: <message naming the field and the fix>`, without a
traceback. Exit status: 0 when training finished or was preempted (SIGTERM, after saving), 1 on a
non-finite loss or a config error.
"""
import difflib
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from m2vla_jax.data import errors as data_errors
from m2vla_jax.sim import workflows
from m2vla_jax.training import config_base
from m2vla_jax.training import sharding
from m2vla_jax.training import trainer
from m2vla_jax.training import validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://.", required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "jax.distributed.initialize(): auto-detect multi-host, force, or never.")
# The mistakes a user fixes in the command line or the config file: reported as one line, no traceback.
_USER_ERRORS = (config_base.ConfigError, data_errors.DataError)


def _exit_with_error(message: str) -> None:
  """Prints `error: <message>` as one line on stderr and exits with status 1."""
  print("error: " + " ".join(str(message).splitlines()), file=sys.stderr, flush=True)
  sys.exit(1)


def _workflow(config):
  """The workflow the config's simulator section names (`sim.workflows`), or None for plain training."""
  try:
    return workflows.resolve(config)
  except ValueError as e:
    _exit_with_error(str(e))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    # Ours stay at INFO: what was read, what the frozen-feature cache built or reused, and why.
    std_logging.getLogger("m2vla_jax").setLevel(std_logging.INFO)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  # Before validation: it reads the device and process counts, and jax.distributed must be set up
  # before anything touches the backend.
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  workflow = _workflow(config)
  # A simulator workflow records its demonstrations (and MJX its pretrained backbone) before
  # training, so its paths are checked by the trainer once they exist.
  try:
    validation.validate_config(config, workdir=_WORKDIR.value, check_paths=workflow is None)
  except _USER_ERRORS as e:
    _exit_with_error(str(e))
  try:
    if workflow is None:
      result = trainer.train(config, _WORKDIR.value)
    else:
      os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen rendering on a machine without a screen
      summary = workflow(config, _WORKDIR.value)
      result = {"step": summary.get("train_steps"), "loss": summary.get("final_loss"),
                "preempted": summary.get("preempted", False),
                "last_checkpoint": summary.get("last_checkpoint")}
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"done: step={result['step']} loss={result['loss']} preempted={result['preempted']} "
        f"last_checkpoint={result.get('last_checkpoint')}", flush=True)
  if workflow is not None and not result["preempted"]:
    section = config[workflows.section(config)]
    print(f"closed-loop report: {_WORKDIR.value}/{section.eval.out_subdir}/summary.json", flush=True)


def _config_arg(argv: list[str]) -> str | None:
  """The value of --config (as `--config=X` or `--config X`), or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(argv: list[str]) -> None:
  """Exits with one `error:` line when the config's short arguments are bad or a `--config.<key>`
  override names no config field.

  config_flags would also refuse both, but inside a multi-line "Flags parsing error" with the config
  file's traceback, or with an AttributeError that names only the last path component.
  """
  config_arg = _config_arg(argv)
  if config_arg is None:
    return
  path, _, arg = config_arg.partition(":")
  try:
    module = config_base.load_config_file(path)
    config = module.get_config(arg or None) if arg else module.get_config()
  except config_base.ConfigError as e:
    _exit_with_error(f"--config={config_arg}: {e}")
  except Exception:  # Let config_flags report a config file that does not load.
    return
  for a in argv:
    if not a.startswith("--config.") or "=" not in a:
      continue
    key = a[len("--config."):].split("=", 1)[0]
    node, walked = config, []
    for part in key.split("."):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = f"; did you mean {', '.join('config.' + '.'.join(walked + [c]) for c in close)}?" if close else ""
        _exit_with_error(f"unknown config key config.{key} (no field {part!r} in "
                         f"config{'.' if walked else ''}{'.'.join(walked)}){hint}")
      node, walked = node[part], walked + [part]


def cli():
  """Console script `m2vla-train`."""
  check_overrides(sys.argv[1:])
  app.run(main)


if __name__ == "__main__":
  cli()
