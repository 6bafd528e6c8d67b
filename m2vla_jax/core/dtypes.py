"""The dtype names configs may use (`frozen_dtype`, `model.dtype`, export `--dtype`); one table."""
from __future__ import annotations

import jax.numpy as jnp

# "none": keep each array's own dtype (e.g. a frozen tower left as loaded).
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16, "none": None}


def dtype(name: str, field: str):
  """The dtype a config names; ValueError naming `field` and the allowed names otherwise."""
  if name not in DTYPES:
    raise ValueError(f"{field}={name!r}: use one of {sorted(DTYPES)}.")
  return DTYPES[name]
