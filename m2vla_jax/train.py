"""Training entry point: `python -m m2vla_jax.train --config=configs/debug.py --workdir=/tmp/run`.

Overrides: `--config.batch_size=256`, `--config.optimizer.lr=3e-4`. The config is locked, so an unknown
key fails in flag parsing and an ill-typed value fails ConfigDict's type check; `validate_config` then
checks ranges and required fields, all before any device work. Exit status: 0 when training finished or
was preempted (SIGTERM, after saving), 1 on a non-finite loss or a config error.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from m2vla_jax.training import sharding
from m2vla_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory, local or gs://.", required=True)
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "jax.distributed.initialize(): auto-detect multi-host, force, or never.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  try:
    trainer.validate_config(config)
  except trainer.ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    sys.exit(1)
  sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
  try:
    result = trainer.train(config, _WORKDIR.value)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"done: step={result['step']} loss={result['loss']} preempted={result['preempted']} "
        f"last_checkpoint={result.get('last_checkpoint')}", flush=True)


if __name__ == "__main__":
  app.run(main)
