"""The data sources a config can name (`config.data.kind`).

A source is a factory `(config, split, batch_size, seed, process_index, process_count)` returning
this host's iterator of numpy batches (batch_size rows of the global batch) with get_state /
set_state / statistics. A 'module:function' string in the config works without a line here.
"""
from __future__ import annotations

from typing import Any

from m2vla_jax.core import registry

SOURCES = {
    "synthetic": "m2vla_jax.data.synthetic:make_data",
    "rlds": "m2vla_jax.data.loader:make_data",
}


def source(name: str, field: str = "config.data.kind") -> Any:
  """The factory `name` names (a SOURCES key or 'module:function'); RegistryError naming `field`."""
  return registry.resolve(name, SOURCES, field)
