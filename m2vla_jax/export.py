"""Inference bundles: `python -m m2vla_jax.export --workdir=RUN --out=DIR [--dtype=bfloat16] [--ema]`.

A bundle (local directory or gs:// prefix) holds everything a robot-side process needs, no optimizer state:
  params.npz       all parameters (trainable from the checkpoint + the frozen backbone), big_vision layout
  state.npz        policy state (the MSM memory, frozen at inference)
  config.json      the training config
  statistics.json  normalization statistics (per dataset), normalization mode, gripper masks
  batch_spec.json  shapes/dtypes of a training batch (to build example inputs)

`load_policy(path)` returns a `Policy`: `policy(observation, rng=None, dataset=None) -> actions [B, H, A]`
in the dataset's original (unnormalized) units.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping, Optional

from absl import app
from absl import flags
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m2vla_jax import tree_util
from m2vla_jax.data import statistics as stats_lib
from m2vla_jax.training import checkpoints as ckpt_lib
from m2vla_jax.training import freezing
from m2vla_jax.training import trainer
from m2vla_jax.weights import npz


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


def export(workdir: str, out: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
           use_ema: bool = False) -> str:
  """Writes a bundle for the run's newest (or given) checkpoint to `out`; returns `out`."""
  config, _, state, assets = restore_run(workdir, step)
  trainable = state.trainable
  if use_ema:
    if state.ema is None:
      raise ValueError("--ema: this run kept no EMA (config.ema_decay == 0)")
    trainable = state.ema
  params = freezing.merge(trainable, state.frozen)
  if dtype:
    cast = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    params = jax.tree_util.tree_map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                    params)
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  _save_npz(out_path / "params.npz", jax.device_get(params), prefix="params/")
  _save_npz(out_path / "state.npz", jax.device_get(state.policy_state), prefix="state/")
  for name in ("config", "statistics", "batch_spec"):
    (out_path / f"{name}.json").write_text(json.dumps(assets[name] if name != "config" else config.to_dict(),
                                                      indent=1, sort_keys=True, default=list))
  return out


def _save_npz(path: epath.Path, tree: Any, prefix: str) -> None:
  """npz.save_npz through a local file, then copied with epath (same filesystem layer as checkpoints)."""
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "x.npz")
    npz.save_npz(local, tree, prefix=prefix)
    with open(local, "rb") as f:
      path.write_bytes(f.read())


def _read_npz(path: epath.Path) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "x.npz")
    with open(local, "wb") as f:
      f.write(path.read_bytes())
    return npz.read_npz(local)


def _strip(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


class Policy:
  """A loaded bundle: `__call__(observation, rng=None, dataset=None) -> actions [B, H, A]` (unnormalized)."""

  def __init__(self, config, params, state, statistics, batch_spec):
    self.config, self.params, self.state = config, params, state
    self.statistics, self.batch_spec = statistics, batch_spec
    self.policy = trainer.build_policy(config)
    self._sample = jax.jit(self.policy.sample_actions)

  @property
  def datasets(self) -> list[str]:
    return sorted(self.statistics["datasets"])

  def unnormalize(self, actions: np.ndarray, dataset: Optional[str] = None) -> np.ndarray:
    """Normalized [..., A] -> the dataset's units (its first A_d dims; the rest is padding and dropped)."""
    if dataset is None:
      if len(self.datasets) != 1:
        raise ValueError(f"this policy was trained on {self.datasets}; pass dataset= to pick the statistics")
      dataset = self.datasets[0]
    if dataset not in self.statistics["datasets"]:
      raise ValueError(f"dataset={dataset!r} is not one of {self.datasets}")
    stats = self.statistics["datasets"][dataset]
    mask = np.asarray(stats.get("action_gripper_mask", [False] * len(stats["action"]["mean"])), bool)
    scale, shift, _, _ = stats_lib.normalizer(stats, "action", self.statistics.get("normalization", "bounds"),
                                              mask=mask)
    d = scale.shape[0]
    return ((np.asarray(actions, np.float64)[..., :d] - shift) / scale).astype(np.float32)

  def normalized_actions(self, observation: Mapping[str, Any], rng: Optional[jax.Array] = None) -> np.ndarray:
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return np.asarray(self._sample(self.params, self.state, dict(observation), rng))

  def __call__(self, observation: Mapping[str, Any], rng: Optional[jax.Array] = None,
               dataset: Optional[str] = None) -> np.ndarray:
    return self.unnormalize(self.normalized_actions(observation, rng), dataset)


def load_policy(path: str) -> Policy:
  """Loads a bundle written by `export` (local or gs://)."""
  p = epath.Path(path)
  config = config_from_json(json.loads((p / "config.json").read_text()))
  params = tree_util.unflatten(_strip(_read_npz(p / "params.npz"), "params/"))
  state = tree_util.unflatten(_strip(_read_npz(p / "state.npz"), "state/"))
  statistics = json.loads((p / "statistics.json").read_text())
  batch_spec = json.loads((p / "batch_spec.json").read_text())
  return Policy(config, params, state, statistics, batch_spec)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError("--workdir and --out are required")
  export(f.workdir, f.out, step=f.step, dtype=f.dtype, use_ema=f.ema)
  print(f"wrote {f.out}")


if __name__ == "__main__":
  # Flags are defined only when run as a program: the module is also a library (load_policy).
  flags.DEFINE_string("workdir", None, "Training run directory (local or gs://).")
  flags.DEFINE_string("out", None, "Bundle directory to write (local or gs://).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "Cast floating params (default: as trained).")
  flags.DEFINE_bool("ema", False, "Export the EMA of the trainable params instead of the raw ones.")
  app.run(main)
