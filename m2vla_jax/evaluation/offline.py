"""Offline action-prediction metrics over held-out batches, per dataset, in the datasets' own units.

`OfflineMetrics.add(dataset_ids, pred, true, mask)` accumulates; `summary()` returns, per dataset:
  l1, mse            mean over valid (step, dim) entries of |pred - true| and (pred - true)^2
  l1_per_dim         [A] mean |pred - true| per action dimension
  gripper_accuracy   fraction of valid steps whose gripper dims agree after thresholding at the midpoint
                     of the dimension's q01..q99 range (open/closed), None if the dataset has no gripper dim
  num_frames, num_steps
Pure numpy float64; `plot_trajectories` draws predicted vs true first-step actions (matplotlib, Agg).

`RouterStatistics` (layer-skipping policies, policies/mole_vla.py): how often each LLM layer is kept
over the evaluated frames, the router's mean entropy and its distinct routes; `plot_router` draws the
keep frequency per layer (MoLe-VLA's layer-usage figure).
"""
from __future__ import annotations

import collections
from typing import Mapping, Sequence

import numpy as np


class OfflineMetrics:
  """Accumulates per-dataset sums. Arrays: pred/true [N, H, A] (unnormalized), mask [N, H] bool."""

  def __init__(self, names: Sequence[str], gripper_masks: Mapping[str, Sequence[bool]],
               gripper_thresholds: Mapping[str, Sequence[float]]):
    self.names = list(names)
    self.gripper_masks = {k: np.asarray(v, bool) for k, v in gripper_masks.items()}
    self.thresholds = {k: np.asarray(v, np.float64) for k, v in gripper_thresholds.items()}
    self._sums: dict[str, dict] = {}
    self.trajectories: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in self.names}

  def add(self, dataset_ids: np.ndarray, pred: np.ndarray, true: np.ndarray, mask: np.ndarray) -> None:
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    mask = np.asarray(mask, bool)
    for i, name in enumerate(self.names):
      rows = np.asarray(dataset_ids) == i
      if not rows.any():
        continue
      p, t, m = pred[rows], true[rows], mask[rows]
      a = p.shape[-1]
      s = self._sums.setdefault(name, {"abs": np.zeros(a), "sq": np.zeros(a), "steps": 0, "frames": 0,
                                       "grip_ok": 0, "grip_n": 0})
      err = (p - t)[m]                                    # [valid steps, A]
      s["abs"] += np.abs(err).sum(0)
      s["sq"] += (err ** 2).sum(0)
      s["steps"] += int(m.sum())
      s["frames"] += int(rows.sum())
      g = self.gripper_masks.get(name)
      if g is not None and g[:a].any():
        th = self.thresholds[name][:a][g[:a]]
        agree = ((p[m][:, g[:a]] > th) == (t[m][:, g[:a]] > th)).all(-1)
        s["grip_ok"] += int(agree.sum())
        s["grip_n"] += int(agree.size)
      self.trajectories[name].append((p[:, 0], t[:, 0]))

  def summary(self) -> dict:
    out = {}
    for name, s in self._sums.items():
      n = max(s["steps"], 1)
      out[name] = {
          "l1": float(s["abs"].sum() / (n * len(s["abs"]))),
          "mse": float(s["sq"].sum() / (n * len(s["sq"]))),
          "l1_per_dim": (s["abs"] / n).tolist(),
          "mse_per_dim": (s["sq"] / n).tolist(),
          "gripper_accuracy": (s["grip_ok"] / s["grip_n"]) if s["grip_n"] else None,
          "num_frames": s["frames"],
          "num_steps": s["steps"],
      }
    return out


class RouterStatistics:
  """Accumulates a layer-skipping router's decisions: gates [N, L] (0/1), probs [N, L].

  Besides the keep frequency per layer (the paper's figure) it counts the distinct routes: the
  frequency alone cannot tell per-sample routing from a few fixed routes (a layer kept by half the
  frames may be one coin flip or many routes), and a router that stopped learning shows as 1-2.
  """

  def __init__(self, top_routes: int = 8):
    self._kept = None
    self._entropy = 0.0
    self._frames = 0
    self._routes = collections.Counter()
    self._top_routes = top_routes

  def add(self, gates: np.ndarray, probs: np.ndarray) -> None:
    gates, probs = np.asarray(gates, np.float64), np.asarray(probs, np.float64)
    if self._kept is None:
      self._kept = np.zeros(gates.shape[-1])
    self._kept += gates.sum(0)
    self._entropy += float(-(probs * np.log(np.maximum(probs, 1e-300))).sum())
    self._frames += gates.shape[0]
    self._routes.update(tuple(np.flatnonzero(g > 0.5).tolist()) for g in gates)

  def summary(self) -> dict:
    n = max(self._frames, 1)
    kept = [] if self._kept is None else (self._kept / n).tolist()
    return {"keep_frequency": kept, "mean_entropy_nats": self._entropy / n, "num_frames": self._frames,
            "layers_kept_per_frame": float(sum(kept)), "distinct_routes": len(self._routes),
            "top_routes": [{"kept_layers": list(r), "frames": c}
                           for r, c in self._routes.most_common(self._top_routes)]}


def plot_router(summary: dict, out_dir: str) -> str:
  """A bar chart of the keep frequency per LLM layer; returns the PNG's path."""
  import io  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  keep = summary["keep_frequency"]
  fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(keep)), 2.6))
  ax.bar(range(len(keep)), keep, color="tab:blue")
  ax.set_xlabel("LLM layer")
  ax.set_ylabel("fraction of frames keeping it")
  ax.set_ylim(0, 1)
  ax.set_title(f"router: {summary['layers_kept_per_frame']:.0f} layers kept per frame, "
               f"{summary['num_frames']} frames")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=80)
  plt.close(fig)
  path = epath.Path(out_dir) / "router_keep.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
  return str(path)


def plot_trajectories(metrics: OfflineMetrics, out_dir: str, max_frames: int = 200) -> list[str]:
  """One PNG per dataset: each action dim's predicted vs true first-step action over consecutive frames."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  written = []
  for name, parts in metrics.trajectories.items():
    if not parts:
      continue
    pred = np.concatenate([p for p, _ in parts])[:max_frames]
    true = np.concatenate([t for _, t in parts])[:max_frames]
    a = pred.shape[-1]
    fig, axes = plt.subplots(a, 1, figsize=(8, 1.6 * a), sharex=True, squeeze=False)
    for d in range(a):
      ax = axes[d, 0]
      ax.plot(true[:, d], label="true", color="k", lw=1)
      ax.plot(pred[:, d], label="predicted", color="tab:orange", lw=1)
      ax.set_ylabel(f"a[{d}]")
    axes[0, 0].legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("frame (held-out, file order)")
    fig.suptitle(f"{name}: predicted vs true action (first step of each chunk)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    path = epath.Path(out_dir) / f"trajectories_{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    written.append(str(path))
  return written
