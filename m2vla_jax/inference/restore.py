"""A training run's checkpoint as (config, policy setup, state, assets), for inference and export.

Restores on this host's devices (one device by default) through the trainer's `setup`, so the frozen
backbone is rebuilt exactly as training built it (from the pretrained weights the config names).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from etils import epath
import jax
import ml_collections

from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import trainer


def config_from_json(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The training config back from its JSON form (lists stay lists; the trainer accepts both)."""
  return ml_collections.ConfigDict(d)


def restore_run(workdir: str, step: Optional[int] = None, single_device: bool = True):
  """(config, setup, state, assets) of a run's checkpoint, restored on this host's devices."""
  ckdir = str(epath.Path(workdir) / "checkpoints")
  step, assets = ckpt_lib.read_assets(ckdir, step)
  config = config_from_json(assets["config"])
  if single_device:
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "model": 1})
  example = trainer.example_from_spec(assets["batch_spec"])
  mesh_devices = jax.devices()[:1] if single_device else None
  s = trainer.setup(config, example, devices=mesh_devices)
  ck = ckpt_lib.Checkpointer(ckdir, keep=None, async_save=False,
                             use_ocdbt=config.checkpoint.get("use_ocdbt", True))
  try:
    state, _, _ = ck._restore_step(step, trainer.abstract_for_restore(s))  # pylint: disable=protected-access
  finally:
    ck.close()
  return config, s, state, assets
