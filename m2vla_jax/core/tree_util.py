"""Parameter trees addressed by '/'-joined paths, the currency of freezing, sharding and loading rules."""
from __future__ import annotations

from typing import Any, Mapping

import jax


def path_str(path) -> str:
  """'/'-joined string for a jax key path (DictKey, GetAttrKey, SequenceKey)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """{'a/b/c': leaf} for every leaf of a nested mapping."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten` for nested dicts."""
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = leaf
  return tree


def map_with_path(fn, tree: Any) -> Any:
  """tree_map where `fn(path_string, leaf)` sees each leaf's '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)
