"""A training run's checkpoint as (config, policy setup, state, assets), for inference and export.

Restores on this host's devices (one device by default) through the trainer's `setup`, so the frozen
backbone is rebuilt exactly as training built it (from the pretrained weights the config names).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from etils import epath
import jax
import ml_collections

from m2vla_jax.core import freezing
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
  check_frozen(assets, state.frozen, where=f"{workdir} step {step}")
  return config, s, state, assets


def check_frozen(assets: Mapping[str, Any], frozen: Mapping[str, Any], where: str) -> None:
  """Frozen weights are rebuilt from the config, not saved: refuse them if they are not the ones the
  run trained with (another pretrained file under the same name, or a changed initialisation)."""
  stored = assets.get("frozen_fingerprint")
  if not stored:      # checkpoints written before fingerprints were stored
    return
  bad = freezing.fingerprint_mismatches(stored, freezing.fingerprint(dict(frozen)))
  if bad:
    raise ValueError(f"{where}: the frozen weights rebuilt from the run's config differ from those it "
                     f"trained with, at {len(bad)} path(s): {bad[:5]}. The pretrained files the "
                     "config names (config.init) or the code that initialises frozen parameters "
                     "changed since training; restore the originals to use this checkpoint")
