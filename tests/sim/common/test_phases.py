"""The shared workflow skeleton: phase timing and the summary file (trainer stubbed out)."""
import json
import time

import pytest

from m2vla_jax.sim.common import phases
from m2vla_jax.training import trainer


def test_timer_records_phases_in_order_and_refuses_a_repeat():
  timer = phases.PhaseTimer()
  with timer("data"):
    time.sleep(0.02)
  with timer("train"):
    pass
  assert list(timer.seconds) == ["data", "train"]
  assert timer.seconds["data"] >= 0.02
  assert timer.total() == pytest.approx(sum(timer.seconds.values()))
  assert timer.line().startswith("wall-clock: data 0s, train 0s, total 0s")
  with pytest.raises(ValueError, match="'data' was already timed"):
    with timer("data"):
      pass


def test_run_phases_runs_in_order_and_writes_the_summary(tmp_path, monkeypatch):
  calls = []
  evaluator = trainer.Evaluator("closed_loop", 5, lambda snapshot: {})
  monkeypatch.setattr(trainer, "train", lambda config, workdir, evaluators: calls.append(
      ("train", workdir, evaluators)) or {"step": 7, "loss": 0.25,
                                          "evaluations": [(5, {"closed_loop/seen_success": 0.5})]})
  path = tmp_path / "eval" / "summary.json"
  summary = phases.run_phases(
      None, str(tmp_path), prepare=[("a", lambda: calls.append("a")), ("b", lambda: calls.append("b"))],
      evaluate=lambda: calls.append("eval") or {"mean": 0.5, "wall_s": {"load_policy": 1.0}},
      summary_path=str(path), evaluators=[evaluator])
  assert calls == ["a", "b", ("train", str(tmp_path), (evaluator,)), "eval"]
  assert summary["during_training"] == [{"step": 5, "closed_loop/seen_success": 0.5}]
  assert list(summary["wall_s"]) == ["load_policy", "a", "b", "train", "evaluate", "total"]
  assert summary["final_loss"] == 0.25 and summary["train_steps"] == 7
  assert json.loads(path.read_text()) == summary
