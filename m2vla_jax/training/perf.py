"""Throughput accounting: a compiled step's FLOPs and the accelerator's peak, for the MFU metric."""
from __future__ import annotations

from typing import Optional

import jax


PEAK_FLOPS = {  # dense bf16 FLOP/s per chip
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


def peak_flops_per_device(config) -> Optional[float]:
  if config.get("peak_flops_per_device"):
    return float(config.peak_flops_per_device)
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name in kind:
      return flops
  return None


def step_flops(compiled) -> Optional[float]:
  """FLOPs of one compiled step per device, from XLA's cost analysis (None if unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])
