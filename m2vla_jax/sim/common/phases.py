"""The run skeleton the simulation workflows share: prepare -> train -> evaluate, timed per phase.

Owns `PhaseTimer` and `run_phases`, used by `m2vla_jax.sim.metaworld.workflow` (Meta-World) and
`m2vla_jax.sim.mjx.workflow` (MJX): each workflow supplies its own preparation phases
(demonstrations, backbone pretraining) and its evaluation; the trainer call, the wall-clock
bookkeeping and the summary file are the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import ml_collections


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
