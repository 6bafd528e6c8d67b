"""Closed-loop scoring and the report files every simulator writes.

Owns: `wilson_interval`; `summarize` (episode records -> per-task and mean success, Meta-World's
convention, used by every simulator); `plot_success` and `write_evaluation` (`<name>.json/.png` of
one evaluation); `policy_latency` (the action-chunk latency of the policy calls); and a workflow's
run report: `run_summary` (summary.json's dict), `markdown` (summary.md's table), `headline` (the
printed line) and `write_run_summary`.

Shapes. An evaluation result (`summarize`, plus what a simulator adds, e.g. MJX's
'named_block_closest'):
```
{'per_task': {task: {'successes', 'episodes', 'success_rate', 'ci95': [lo, hi], 'failures', ...}},
 'mean_success': float, 'mean_ci95': [lo, hi], 'episodes': int, ...}
```
A run summary (`<workdir>/<out_subdir>/summary.json`):
```
{'workdir', 'dataset', 'tasks', <context of the simulator>,
 '<group>s': {evaluation name: {
     'mean_success', 'mean_ci95', 'episodes', <extra>,
     'per_task': {task: {'successes', 'episodes', 'success_rate', 'ci95'}}}},
 'wall_s': {part: seconds}, 'policy_latency': {...} (optional, `policy_latency`)}
```
`group` says what the evaluations of a run are: Meta-World's instruction 'variant's ('seen',
'paraphrased', 'held_out_tasks'), MJX's 'rollout's ('compiled MJX', 'C MuJoCo', ...).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile
TASK_FIELDS = ("successes", "episodes", "success_rate", "ci95")   # per task in a run summary


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion (0, 1) when n == 0."""
  if n == 0:
    return 0.0, 1.0
  if not 0 <= successes <= n:
    raise ValueError(f"successes={successes} must lie in [0, n={n}]")
  p = successes / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def summarize(episodes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Per-task and mean success with 95% Wilson intervals of episode records (task, success, reason).

  The mean is the unweighted mean of per-task rates (Meta-World's convention); its interval is
  the Wilson interval of the pooled episodes, exact when every task has the same episode count.
  `failures` counts the failed episodes of a task by the first word of their reason.
  """
  per_task: dict[str, dict[str, Any]] = {}
  for ep in episodes:
    entry = per_task.setdefault(ep["task"], {"successes": 0, "episodes": 0, "failures": {}})
    entry["episodes"] += 1
    entry["successes"] += int(ep["success"])
    if not ep["success"]:
      kind = ep["reason"].split(":")[0].split(" ")[0]
      entry["failures"][kind] = entry["failures"].get(kind, 0) + 1
  for entry in per_task.values():
    entry["success_rate"] = entry["successes"] / entry["episodes"]
    entry["ci95"] = list(wilson_interval(entry["successes"], entry["episodes"]))
  total = sum(e["episodes"] for e in per_task.values())
  succ = sum(e["successes"] for e in per_task.values())
  return {
      "per_task": per_task,
      "mean_success": float(np.mean([e["success_rate"] for e in per_task.values()]))
                      if per_task else 0.0,
      "mean_ci95": list(wilson_interval(succ, total)),
      "episodes": total,
  }


def plot_success(summary: Mapping[str, Any], path: str, title: str = "") -> None:
  """Bar plot of per-task success with Wilson 95% intervals."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(summary["per_task"])
  rates = np.array([summary["per_task"][t]["success_rate"] for t in tasks])
  ci = np.array([summary["per_task"][t]["ci95"] for t in tasks]).reshape(-1, 2)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(tasks) + 1.5), 3.6))
  # Wilson ends are rounded floats, so at rates of exactly 0 or 1 an end can fall a hair past the
  # rate; matplotlib refuses negative error bars.
  yerr = np.maximum(np.stack([rates - ci[:, 0], ci[:, 1] - rates]), 0.0)
  ax.bar(range(len(tasks)), rates, yerr=yerr, capsize=3, color="tab:blue")
  ax.axhline(summary["mean_success"], color="tab:red", ls="--",
             label=f"mean {summary['mean_success']:.2f}")
  ax.set_xticks(range(len(tasks)))
  ax.set_xticklabels([t.removesuffix("-v3") for t in tasks], rotation=60, ha="right", fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("success rate (95% Wilson CI)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_evaluation(result: Mapping[str, Any], out_dir: str, name: str) -> None:
  """`<out_dir>/<name>.json` (the whole result) and `<name>.png` (`plot_success`)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(result, f, indent=1)
  plot_success(result, os.path.join(out_dir, f"{name}.png"),
               title=f"{name}: mean {result['mean_success']:.3f}")


def brief(result: Mapping[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
  """One evaluation's entry in a run summary: mean, interval, episodes, the `extra` fields of the
  result (None where absent) and TASK_FIELDS per task."""
  return {"mean_success": result["mean_success"], "mean_ci95": list(result["mean_ci95"]),
          "episodes": result["episodes"], **{k: result.get(k) for k in extra},
          "per_task": {t: {f: x[f] for f in TASK_FIELDS} for t, x in result["per_task"].items()}}


def policy_latency(call_seconds: Sequence[tuple[int, float]]) -> dict[str, Any] | None:
  """Action-chunk latency of an evaluation's policy calls [(batch size, seconds)], at the batch size
  called most often: median and 90th percentile in ms, without each batch size's first call (it
  compiles), which is reported apart. None when no batch size was called twice."""
  by_batch: dict[int, list[float]] = {}
  for batch, seconds in call_seconds:
    by_batch.setdefault(int(batch), []).append(float(seconds))
  if not by_batch:
    return None
  batch, times = max(by_batch.items(), key=lambda item: (len(item[1]), item[0]))
  if len(times) < 2:
    return None
  rest = np.asarray(times[1:])
  return {"batch_size": batch, "calls": len(rest), "median_ms": float(np.median(rest) * 1e3),
          "p90_ms": float(np.percentile(rest, 90) * 1e3), "first_call_s": times[0]}


def run_summary(workdir: str, dataset: str, tasks: Sequence[str], group: str,
                results: Mapping[str, Mapping[str, Any]], wall_s: Mapping[str, Any],
                extra: Sequence[str] = (), **context: Any) -> dict[str, Any]:
  """summary.json of a workflow's evaluation (module docstring): `context` (simulator settings
  worth keeping with the numbers) after the tasks, then `<group>s` of `brief`s and `wall_s`."""
  return {"workdir": workdir, "dataset": dataset, "tasks": list(tasks), **context,
          f"{group}s": {name: brief(r, extra) for name, r in results.items()},
          "wall_s": dict(wall_s)}


def markdown(results: Mapping[str, Mapping[str, Any]], group: str,
             columns: Mapping[str, str] | None = None) -> str:
  """One table: evaluation x task success (successes/episodes and rate), the mean with its 95%
  interval, and `columns` {header: field} read from each task entry and each result ('-' where
  absent)."""
  columns = dict(columns or {})

  def cells(entry):
    return "".join(f" {'-' if entry.get(k) is None else format(entry[k], '.2f')} |"
                   for k in columns.values())

  lines = ["| " + " | ".join([group, "task", "success", "episodes", "95% CI", *columns]) + " |",
           "|" + "---|" * (5 + len(columns))]
  for name, r in results.items():
    for task, t in r["per_task"].items():
      lo, hi = t["ci95"]
      lines.append(f"| {name} | {task} | {t['successes']}/{t['episodes']} "
                   f"({t['success_rate']:.2f}) | {t['episodes']} | {lo:.2f}-{hi:.2f} |{cells(t)}")
    lo, hi = r["mean_ci95"]
    lines.append(f"| **{name}** | **mean** | **{r['mean_success']:.3f}** | {r['episodes']} | "
                 f"{lo:.2f}-{hi:.2f} |{cells(r)}")
  return "\n".join(lines) + "\n"


def headline(name: str, result: Mapping[str, Any], seconds: float | None = None) -> str:
  lo, hi = result["mean_ci95"]
  took = "" if seconds is None else f", {seconds:.0f}s"
  return (f"{name}: mean success {result['mean_success']:.3f} (95% CI {lo:.2f}-{hi:.2f}, "
          f"{result['episodes']} episodes{took})")


def write_run_summary(out_dir: str, summary: Mapping[str, Any], table: str) -> None:
  """`<out_dir>/summary.json` (the run summary) and `summary.md` (`table`, e.g. `markdown(...)`)."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(out_dir, "summary.md"), "w") as f:
    f.write(table)
