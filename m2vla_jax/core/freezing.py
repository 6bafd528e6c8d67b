"""Which parameters train: regex rules over parameter paths, as data in the config.

A rule list is `[(regex, trainable), ...]`; the first rule whose regex fully matches a path decides.
Every path must be matched by some rule (end the list with `('.*', ...)`), so a new parameter can never
be frozen or trained by accident. Frozen parameters are cast to `frozen_dtype` (bf16 by default): they
get no gradient and no optimizer state because the trainer differentiates only the trainable subtree.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from m2vla_jax.core import tree_util

Rules = Sequence[tuple[str, bool]]


def trains(path: str, rules: Rules) -> bool:
  """Whether the parameter at `path` trains: the first rule whose regex fully matches decides."""
  for pattern, trainable in rules:
    if re.fullmatch(pattern, path):
      return bool(trainable)
  raise ValueError(f"parameter {path!r} matches no freezing rule; add a rule for it or end "
                   f"config.model.trainable with ('.*', True) or ('.*', False)")


def trainable_mask(params: Any, rules: Rules) -> Any:
  """A tree of bools, True where the parameter trains."""
  return tree_util.map_with_path(lambda path, _: trains(path, rules), params)


def split(params: Any, mask: Any) -> tuple[dict, dict]:
  """(trainable, frozen) flat dicts keyed by path; `merge` undoes it."""
  flat, flat_mask = tree_util.flatten(params), tree_util.flatten(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> dict:
  """Nested parameter tree from the two flat halves."""
  return tree_util.unflatten({**frozen, **trainable})


def cast_frozen(frozen: dict, dtype: Any = jnp.bfloat16) -> dict:
  """Frozen weights in a compact dtype (they are only read)."""
  if dtype is None:
    return frozen
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                frozen)


def fingerprint(frozen: dict) -> dict[str, list[float]]:
  """{path: [mean, root mean square]} in float64 of each frozen array: stored with checkpoints, because
  the frozen weights are rebuilt from the config (pretrained files, random init from the seed) rather
  than saved. Statistics, not a hash: the same init on another CPU may differ in its last bits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  chunk = 1 << 20   # float64 sums a chunk at a time: no full-size float64 copy of a large embedding
  out = {}
  for path in sorted(frozen):
    flat = np.asarray(jax.device_get(frozen[path])).reshape(-1)
    total = squares = 0.0
    for i in range(0, flat.size, chunk):
      part = flat[i:i + chunk].astype(np.float64)
      total += float(part.sum())
      squares += float(np.dot(part, part))
    n = max(flat.size, 1)
    out[path] = [total / n, float(np.sqrt(squares / n))]
  return out


def fingerprint_mismatches(stored: dict, current: dict, rtol: float = 1e-4) -> list[str]:
  """Paths whose frozen weights differ from the stored fingerprint (missing or added paths too)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  bad = sorted(set(stored) ^ set(current))
  for path in sorted(set(stored) & set(current)):
    (m0, r0), (m1, r1) = stored[path], current[path]
    if not (np.isclose(r1, r0, rtol=rtol, atol=1e-12)
            and np.isclose(m1, m0, rtol=rtol, atol=rtol * max(r0, 1e-12))):
      bad.append(path)
  return bad
