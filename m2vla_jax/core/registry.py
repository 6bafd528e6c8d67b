"""Resolve a registry name or a 'module:attribute' string to the object it names.

Registries (policies, data sources) are plain dicts of name -> 'module:attribute'; importing lazily
keeps a config that names a policy from importing every other policy's code.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping


class RegistryError(ValueError):
  """A config names something no registry knows and that does not import."""


def resolve(name: str, registry: Mapping[str, str], field: str) -> Any:
  """registry[name] (or `name` itself when it is 'module:attribute') imported; errors name `field`."""
  target = registry.get(name, name)
  if ":" not in target:
    raise RegistryError(f"{field}={name!r} is neither one of {sorted(registry)} nor a "
                        "'module:attribute' string")
  module, attr = target.split(":", 1)
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise RegistryError(f"{field}={name!r}: cannot import {target} ({e})") from e
