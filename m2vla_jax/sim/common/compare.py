"""The comparison table: closed-loop success of several rows (model x setting), each over several seeds.

Owns pooling runs into table cells, so every row of docs/results/ is computed the same way from the
runs' own `summary.json` files rather than typed by hand: per row and evaluation variant, the episodes
of all seeds pooled (rate and 95% Wilson interval), the per-seed rates, and their spread (sample std).
A row lists one or more summary files per seed (e.g. the run's `sim_eval/summary.json` and a later
`sim_eval_shift/summary.json`); `path#v1,v2` takes only those variants from a file; a variant found
twice for one seed is an error.

    python -m m2vla_jax.sim.common.compare --spec docs/results/metaworld_rows.json \
        --out docs/results/metaworld.md

spec: [{"label": str, "command": str, "seeds": {"0": [summary.json, ...], "1": [...]},
         "trainable": str (optional)}, ...]
`trainable` is the share of parameters the row trains, as the trainer prints it at start ("Parameters
by optimizer group"); when any row has one, the table gets a column for it. Likewise the action-chunk
latency: the median over seeds of each summary's `policy_latency` median (ms per policy call at the
evaluation's batch size, `evaluation.summary.policy_latency`), for rows whose runs recorded it.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from m2vla_jax.evaluation import summary as summary_lib


def _variants(paths: Sequence[str]) -> dict[str, Mapping[str, Any]]:
  out: dict[str, Mapping[str, Any]] = {}
  for item in paths:
    path, _, only = item.partition("#")
    keep = set(only.split(",")) if only else None
    with open(path) as f:
      summary = json.load(f)
    groups = summary.get("variants") or summary.get("rollouts")
    if groups is None:
      raise ValueError(f"{path}: no 'variants' (Meta-World) or 'rollouts' (MJX) in the summary")
    for name, result in groups.items():
      if keep is not None and name not in keep:
        continue
      if name in out:
        raise ValueError(f"{path}: variant {name!r} appears in two summaries of one seed")
      out[name] = result
  return out


def row_cells(seeds: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Any]]:
  """{variant: {successes, episodes, rate, ci95, per_seed {seed: rate}, seed_std}} for one row."""
  per_seed = {seed: _variants(paths) for seed, paths in seeds.items()}
  names = sorted({v for variants in per_seed.values() for v in variants})
  cells = {}
  for name in names:
    succ, eps, rates = 0, 0, {}
    for seed, variants in per_seed.items():
      if name not in variants:
        continue
      r = variants[name]
      n = int(r["episodes"])
      k = int(round(float(r["mean_success"]) * n))
      succ, eps, rates[seed] = succ + k, eps + n, k / n
    lo, hi = summary_lib.wilson_interval(succ, eps)
    values = list(rates.values())
    cells[name] = {"successes": succ, "episodes": eps, "rate": succ / eps if eps else float("nan"),
                   "ci95": [lo, hi], "per_seed": rates,
                   "seed_std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
  return cells


def row_latency(seeds: Mapping[str, Sequence[str]]) -> dict[str, Any] | None:
  """{median_ms, batch_size, seeds}: the median over seeds of their summaries' median policy-call
  time; None when no seed recorded one. Seeds evaluated at different batch sizes are an error."""
  found = {}
  for seed, paths in seeds.items():
    for item in paths:
      with open(item.partition("#")[0]) as f:
        latency = json.load(f).get("policy_latency")
      if latency:
        found[seed] = latency
        break
  if not found:
    return None
  batches = {int(v["batch_size"]) for v in found.values()}
  if len(batches) > 1:
    raise ValueError(f"seeds {sorted(found)} timed policy calls at different batch sizes "
                     f"{sorted(batches)}")
  return {"median_ms": float(np.median([v["median_ms"] for v in found.values()])),
          "batch_size": batches.pop(), "seeds": len(found)}


def table(rows: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> str:
  """Markdown: one line per row; a cell is 'pooled rate (Wilson 95%) · per-seed rates'."""
  trainable = any("trainable" in row for row in rows)
  latency = any(row.get("latency") for row in rows)
  fixed = (["row", "seeds"] + (["trainable"] if trainable else [])
           + (["policy call (median)"] if latency else []))
  lines = ["| " + " | ".join(fixed + list(variants)) + " |",
           "|" + "---|" * (len(variants) + len(fixed))]
  for row in rows:
    cells = row["cells"]
    out = []
    for v in variants:
      c = cells.get(v)
      if c is None:
        out.append("—")
        continue
      seeds = " / ".join(f"{r:.2f}" for r in c["per_seed"].values())
      out.append(f"**{c['rate']:.3f}** ({c['ci95'][0]:.2f}–{c['ci95'][1]:.2f}, n={c['episodes']}) · {seeds}")
    share = [row.get("trainable", "—")] if trainable else []
    if latency:
      lat = row.get("latency")
      if lat is None:
        share.append("—")
      else:
        some = "" if lat["seeds"] == len(row["seeds"]) else f" ({lat['seeds']} of {len(row['seeds'])} seeds)"
        share.append(f"{lat['median_ms']:.0f} ms at batch {lat['batch_size']}{some}")
    lines.append("| " + " | ".join([row["label"], str(len(row["seeds"]))] + share + out) + " |")
  lines.append("")
  lines.append("Commands (one per row; seed S replaces `$S`):")
  for row in rows:
    lines.append(f"- {row['label']}: `{row['command']}`")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--spec", required=True, help="JSON list of rows (see the module docstring)")
  p.add_argument("--variants", default="seen,paraphrased,held_out_tasks,shift_camera,shift_lighting,"
                                       "shift_colors")
  p.add_argument("--out", required=True, help="markdown file; a .json with the cells is written beside")
  args = p.parse_args(argv)
  with open(args.spec) as f:
    rows = json.load(f)
  for row in rows:
    missing = [x for paths in row["seeds"].values() for x in paths
               if not os.path.exists(x.partition("#")[0])]
    if missing:
      raise SystemExit(f"row {row['label']!r}: summary files not found: {missing}")
    row["cells"] = row_cells(row["seeds"])
    row["latency"] = row_latency(row["seeds"])
  variants = [v for v in args.variants.split(",") if v]
  text = table(rows, variants)
  with open(args.out, "w") as f:
    f.write(text)
  with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
    json.dump(rows, f, indent=1)
  print(text)


if __name__ == "__main__":
  main()
