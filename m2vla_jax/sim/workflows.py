"""Which simulator workflow a config names: its section ('sim', 'mjx' or 'libero'), if any.

A config with a simulator section runs that simulator's workflow (demonstrations -> train ->
closed-loop evaluation) instead of plain training (`train.py`). The workflow registers its
demonstrations in the data registry in the process that prepares them, so another process that
reads a simulator run's data (offline evaluation) calls `prepare_data` first: it reuses the
recorded demonstrations (recording them again only if their cache is gone) and registers them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from m2vla_jax.core import registry

MODULES = {"sim": "m2vla_jax.sim.metaworld.workflow", "mjx": "m2vla_jax.sim.mjx.workflow",
           "libero": "m2vla_jax.sim.libero.workflow"}


def section(config: Mapping[str, Any]) -> Optional[str]:
  """The simulator section of `config`, or None for plain training; two sections are an error."""
  sections = [k for k in MODULES if k in config]
  if len(sections) > 1:
    raise ValueError(f"config has sections {sections}; a config runs one simulator workflow")
  return sections[0] if sections else None


def resolve(config: Mapping[str, Any], attribute: str = "run") -> Optional[Callable[..., Any]]:
  """`attribute` ('run', 'prepare_data') of the workflow the config names, or None."""
  name = section(config)
  if name is None:
    return None
  return registry.resolve(name, {k: f"{m}:{attribute}" for k, m in MODULES.items()}, "config section")


def prepare_data(config: Mapping[str, Any]) -> bool:
  """Registers a simulator run's demonstrations in this process; False for a config without one."""
  prepare = resolve(config, "prepare_data")
  if prepare is None:
    return False
  prepare(config)
  return True
