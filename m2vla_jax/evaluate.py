"""Offline evaluation: `python -m m2vla_jax.evaluate --checkpoint=BUNDLE_OR_WORKDIR --out=DIR
[--dataset=bridge --data_dir=...] [--max_batches=N] [--split=val|train]`.

Runs the policy over held-out episodes (the data pipeline's non-train split: each dataset read once, in
file order), compares its action chunks with the recorded ones in the datasets' own units, and writes
`metrics.json` (per dataset: action L1 / MSE, per-dimension errors, gripper accuracy; see
`evaluation/offline.py`) and `trajectories_<dataset>.png`. `--checkpoint` is an export bundle or a
training workdir (its newest checkpoint). A layer-skipping policy (mole_vla) also gets `router` in
metrics.json (keep frequency per LLM layer, mean router entropy) and `router_keep.png`.
"""
from __future__ import annotations

import json
from typing import Optional

from absl import app
from absl import flags
from etils import epath
import jax
import numpy as np

from m2vla_jax.evaluation import offline
from m2vla_jax.inference import InferencePolicy
from m2vla_jax.sim import workflows
from m2vla_jax.training import trainer


def load(path: str) -> InferencePolicy:
  """The policy of an export bundle or of a training workdir's newest checkpoint."""
  if (epath.Path(path) / "params.npz").exists():
    return InferencePolicy.from_bundle(path)
  return InferencePolicy.from_workdir(path)


def _thresholds(stats: dict) -> list[float]:
  a = stats["action"]
  return [(lo + hi) / 2 for lo, hi in zip(a["q01"], a["q99"])]


def evaluate(policy: InferencePolicy, *, dataset: Optional[str] = None, data_dir: Optional[str] = None,
             max_batches: Optional[int] = None, out: Optional[str] = None, seed: int = 0,
             split: str = "val") -> dict:
  """Metrics dict {'datasets': {name: {...}}, 'num_batches': n}; writes metrics.json and plots to `out`.

  `split` 'val' reads the validation split (`config.data.val_split`) once in file order; 'train'
  reads the training split shuffled (it repeats: give `max_batches`), e.g. router statistics over a
  sample of every task's frames. Simulator configs validate on their training demonstrations
  (val_split 'train'), so there 'val' is one ordered pass over all of them."""
  if split not in ("val", "train"):
    raise ValueError(f"split={split!r}; use 'val' (held-out episodes) or 'train' (with max_batches)")
  if split == "train" and max_batches is None:
    raise ValueError("split='train' repeats forever: give max_batches")
  config = policy.config.copy_and_resolve_references()
  if config.data.kind == "rlds":
    with config.unlocked():
      if dataset:
        config.data.pipeline.datasets = dataset
      if data_dir:
        config.data.pipeline.data_dir = data_dir
  # A simulator run's demonstrations are registered by the process that prepares them: this one too.
  workflows.prepare_data(config)
  data = trainer.build_data(config, split)
  names = policy.datasets
  stats = policy.statistics["datasets"]
  if dataset and config.data.kind != "rlds":
    raise ValueError(f"--dataset applies to RLDS runs; this policy's data kind is {config.data.kind!r}")
  info = getattr(data, "info", None)
  metrics = offline.OfflineMetrics(
      names, {n: stats[n].get("action_gripper_mask", []) for n in names},
      {n: _thresholds(stats[n]) for n in names})
  rng = jax.random.PRNGKey(seed)
  route_fn = getattr(policy.policy, "route", None)     # layer-skipping policies (mole_vla)
  router = offline.RouterStatistics() if route_fn is not None else None
  route_fn = jax.jit(route_fn) if route_fn is not None else None
  n = 0
  for batch in data:
    if max_batches is not None and n >= max_batches:
      break
    if info is not None:
      ds_index = info.dataset_of(batch["frame_id"])
      ds_names = [info.datasets[i] for i in ds_index]
    else:
      ds_names = [names[0]] * batch["frame_id"].shape[0]
    pred_norm = policy.normalized_actions(batch["observation"], jax.random.fold_in(rng, n))
    true_norm = batch["actions"]
    ids = np.array([names.index(d) for d in ds_names])
    pred = np.zeros(pred_norm.shape, np.float64)
    true = np.zeros(true_norm.shape, np.float64)
    dims = pred.shape[-1]
    for i, name in enumerate(names):
      rows = ids == i
      if rows.any():
        p, t = policy.unnormalize(pred_norm[rows], name), policy.unnormalize(true_norm[rows], name)
        d = p.shape[-1]
        dims = min(dims, d)
        pred[rows, ..., :d], true[rows, ..., :d] = p, t
    metrics.add(ids, pred[..., :dims], true[..., :dims], batch["action_mask"])
    if router is not None:
      route = route_fn(policy.params, dict(batch["observation"]))
      router.add(np.asarray(route["gates"]), np.asarray(route["probs"]))
    n += 1
  result = {"datasets": metrics.summary(), "num_batches": n}
  if router is not None:
    result["router"] = router.summary()
  if out:
    out_path = epath.Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    result["plots"] = offline.plot_trajectories(metrics, out)
    if router is not None:
      result["plots"].append(offline.plot_router(result["router"], out))
    (out_path / "metrics.json").write_text(json.dumps(result, indent=1, sort_keys=True))
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.checkpoint:
    raise app.UsageError("--checkpoint is required")
  result = evaluate(load(f.checkpoint), dataset=f.dataset, data_dir=f.data_dir, max_batches=f.max_batches,
                    out=f.out, split=f.split)
  print(json.dumps(result, indent=1, sort_keys=True))


def cli():
  """Console script `m2vla-evaluate`. Flags are defined here, not at import: the library is imported
  beside other entry points whose flags share names (--out)."""
  flags.DEFINE_string("checkpoint", None, "Export bundle or training workdir (local or gs://).")
  flags.DEFINE_string("dataset", None, "Mixture/dataset names for the RLDS pipeline (default: trained).")
  flags.DEFINE_string("data_dir", None, "RLDS root (default: the training config's).")
  flags.DEFINE_string("out", None, "Directory for metrics.json and plots.")
  flags.DEFINE_integer("max_batches", None, "Stop after this many batches.")
  flags.DEFINE_enum("split", "val", ["val", "train"], "'val': held-out episodes, read once; 'train': "
                    "the training split shuffled (needs --max_batches).")
  app.run(main)


if __name__ == "__main__":
  cli()
