"""Inference: a trained policy without its optimizer, and the one observation -> action path.

  restore.py        a run's checkpoint -> config, policy setup, state, assets
  normalization.py  raw state in, unnormalized actions out (numpy or in-graph), one formula
  policy.py         InferencePolicy: model observation -> actions in the dataset's units
  observation.py    ObservationEncoder: raw frames, state and instruction strings -> model observation
  bundle.py         export bundles: export(workdir, out), load_policy(path) checks all of it
"""
from m2vla_jax.inference.bundle import BundleError, export, load_policy  # noqa: F401
from m2vla_jax.inference.policy import InferencePolicy  # noqa: F401
