"""Entry point: `python -m m2vla_jax.export --workdir=RUN --out=DIR [--dtype=bfloat16] [--ema]`.

Writes an inference bundle (`inference/bundle.py` says what it holds); load it with
`m2vla_jax.inference.load_policy(DIR)`.
"""
from absl import app
from absl import flags

from m2vla_jax.inference import bundle

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (local or gs://).")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to write (local or gs://).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Cast floating params (default: as trained).")
_EMA = flags.DEFINE_bool("ema", False, "Export the EMA of the trainable params instead of the raw ones.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  bundle.export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value, use_ema=_EMA.value)
  print(f"wrote {_OUT.value}")


def cli():
  """Console script `m2vla-export`."""
  app.run(main)


if __name__ == "__main__":
  cli()
