"""The run skeleton the simulation workflows share: prepare -> train -> evaluate, timed per phase.

Owns `PhaseTimer` and `run_phases`, used by the Meta-World, MJX and LIBERO workflows: each supplies
its own preparation phases (demonstrations, backbone pretraining) and its evaluation; the trainer
call, the wall-clock bookkeeping and the summary file are the same. The evaluation phase of each
opens with `open_evaluation` (report folder, timed policy load) and ends with `write_evaluation`
(summary.json / summary.md, one headline per result).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import ml_collections

from m2vla_jax.evaluation import summary as summary_lib


def open_evaluation(workdir: str, out_subdir: str, load: Callable[[], Any], policy: Any = None
                    ) -> tuple[str, Any, dict[str, float]]:
  """(out_dir, policy, wall) for a closed-loop evaluation of a run: `<workdir>/<out_subdir>` made,
  `policy` as given (tests) or `load()` (the run's newest checkpoint), its seconds in
  wall['load_policy'] (the evaluations add theirs)."""
  out_dir = os.path.join(workdir, out_subdir)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  if policy is None:
    policy = load()
  return out_dir, policy, {"load_policy": time.time() - t0}


def write_evaluation(out_dir: str, summary: dict[str, Any], table: str, headlines: Sequence[str]
                     ) -> dict[str, Any]:
  """summary.json + summary.md (`table`) into out_dir, each headline printed; returns `summary`."""
  summary_lib.write_run_summary(out_dir, summary, table)
  for line in headlines:
    print(line, flush=True)
  return summary


class PhaseTimer:
  """Wall-clock seconds per named phase, in the order they ran."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    if name in self.seconds:
      raise ValueError(f"phase {name!r} was already timed; phases are {list(self.seconds)}")
    t = time.time()
    try:
      yield
    finally:
      self.seconds[name] = time.time() - t

  def total(self) -> float:
    return sum(self.seconds.values())

  def line(self) -> str:
    parts = [f"{k} {v:.0f}s" for k, v in self.seconds.items()]
    return "wall-clock: " + ", ".join(parts + [f"total {self.total():.0f}s"])


def run_phases(config: ml_collections.ConfigDict, workdir: str,
               prepare: Sequence[tuple[str, Callable[[], Any]]],
               evaluate: Callable[[], dict[str, Any]], summary_path: str,
               evaluators: Sequence[Any] = ()) -> dict[str, Any]:
  """Runs `prepare` phases, `trainer.train(config, workdir, evaluators)`, then `evaluate()`.

  `evaluate` returns the workflow's summary dict (with a 'wall_s' dict of its own parts); the
  phases' seconds, their total, the final loss and step, and the evaluators' scalars by step
  ('during_training') are added to it and it is rewritten to `summary_path`. Returns the summary.
  """
  from m2vla_jax.training import trainer  # pylint: disable=g-import-not-at-top
  timer = PhaseTimer()
  for name, fn in prepare:
    with timer(name):
      fn()
  with timer("train"):
    result = trainer.train(config, workdir, tuple(evaluators))
  print(f"trained: step={result['step']} loss={result['loss']} "
        f"({timer.seconds['train']:.0f}s)", flush=True)
  if result.get("preempted"):   # SIGTERM saved a checkpoint: resume trains on, evaluation waits for it
    return {"preempted": True, "train_steps": result["step"], "final_loss": result["loss"],
            "last_checkpoint": result.get("last_checkpoint"), "wall_s": dict(timer.seconds)}
  with timer("evaluate"):
    summary = evaluate()
  summary.setdefault("wall_s", {}).update(timer.seconds, total=timer.total())
  summary["final_loss"] = result["loss"]
  summary["train_steps"] = result["step"]
  summary["last_checkpoint"] = result.get("last_checkpoint")
  if result.get("evaluations"):
    summary["during_training"] = [{"step": step, **scalars} for step, scalars in result["evaluations"]]
  os.makedirs(os.path.dirname(summary_path), exist_ok=True)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=1)
  print(timer.line(), flush=True)
  return summary
