"""Merge imported weights into an initialised parameter tree, refusing silent partial loads.

Every importer (big_vision .npz, Hugging Face, GGUF) produces a flat `{path: array}` dict in our layout
and hands it here. The merge checks the loaded keys against the model's own tree (from `init` or
`jax.eval_shape(init)`): every key the model expects must be loaded unless the caller names it in
`missing_ok` (a regex, e.g. 'queries|head/.*'), no loaded key may be unknown to the model, and shapes
must agree. Dtypes are cast to the reference leaf's dtype. All problems are reported together.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from m2vla_jax.core import tree_util


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model: lists every missing, unexpected or mis-shaped key."""


def merge_params(reference: Any, loaded: Mapping[str, Any], *, missing_ok: str | None = None,
                 source: str = "checkpoint") -> dict:
  """Returns `reference` with every leaf replaced by the loaded array of the same path.

  Args:
    reference: the model's parameter tree (arrays or ShapeDtypeStructs); leaves not loaded are kept
      (they must match `missing_ok`).
    loaded: flat {'a/b/c': array} in our layout.
    missing_ok: regex (full match) over paths the caller allows to be absent from `loaded`.
    source: a name for the checkpoint, used in error messages.
  """
  ref_flat = tree_util.flatten(reference)
  missing_re = re.compile(missing_ok) if missing_ok else None
  missing = [k for k in ref_flat if k not in loaded and not (missing_re and missing_re.fullmatch(k))]
  unexpected = [k for k in loaded if k not in ref_flat]
  misshaped = [
      f"{k}: {source} has {tuple(np.shape(loaded[k]))}, model expects {tuple(ref_flat[k].shape)}"
      for k in ref_flat if k in loaded and tuple(np.shape(loaded[k])) != tuple(ref_flat[k].shape)
  ]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(missing))
                    + " — pass missing_ok=<regex> if they are meant to stay at their initial values")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)))
  if misshaped:
    problems.append(f"shape mismatches ({len(misshaped)}): " + "; ".join(misshaped))
  if problems:
    raise CheckpointMismatchError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))

  def pick(path, ref_leaf):
    if path in loaded:
      value = loaded[path]
      dtype = ref_leaf.dtype
      if isinstance(value, jax.Array):
        return value.astype(dtype)
      return np.asarray(value).astype(dtype)
    return ref_leaf

  return tree_util.map_with_path(pick, reference)
