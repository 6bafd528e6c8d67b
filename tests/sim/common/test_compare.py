"""The comparison table pools seeds by episodes (checked against hand counts) and refuses a variant
reported twice for one seed."""
import json

import pytest

from m2vla_jax.evaluation import summary
from m2vla_jax.sim.common import compare


def _summary(path, variants):
  path.write_text(json.dumps({"variants": {k: {"mean_success": s / n, "episodes": n}
                                           for k, (s, n) in variants.items()}}))
  return str(path)


def test_row_pools_episodes_of_every_seed(tmp_path):
  seeds = {"0": [_summary(tmp_path / "a.json", {"seen": (30, 40)}),
                 _summary(tmp_path / "a_shift.json", {"shift_camera": (10, 20)})],
           "1": [_summary(tmp_path / "b.json", {"seen": (20, 40), "shift_camera": (5, 20)})]}
  cells = compare.row_cells(seeds)
  assert cells["seen"]["successes"] == 50 and cells["seen"]["episodes"] == 80
  assert cells["seen"]["rate"] == pytest.approx(50 / 80)
  assert cells["seen"]["ci95"] == list(summary.wilson_interval(50, 80))
  assert cells["seen"]["per_seed"] == {"0": 0.75, "1": 0.5}
  assert cells["seen"]["seed_std"] == pytest.approx(0.1767767, rel=1e-6)   # std of (0.75, 0.5), ddof 1
  assert cells["shift_camera"]["successes"] == 15 and cells["shift_camera"]["episodes"] == 40
  text = compare.table([{"label": "r", "command": "cmd $S", "seeds": seeds, "cells": cells}],
                       ["seen", "held_out_tasks"])
  assert "**0.625** (" in text and "| — |" in text and "`cmd $S`" in text


def test_a_variant_twice_for_one_seed_is_an_error(tmp_path):
  a = _summary(tmp_path / "a.json", {"seen": (1, 2)})
  b = _summary(tmp_path / "b.json", {"seen": (2, 2)})
  with pytest.raises(ValueError, match="'seen' appears in two summaries"):
    compare.row_cells({"0": [a, b]})
  c = _summary(tmp_path / "c.json", {"seen": (2, 2), "shift_colors": (0, 2)})
  cells = compare.row_cells({"0": [a, c + "#shift_colors"]})       # only the named variants of c
  assert cells["seen"]["successes"] == 1 and cells["shift_colors"]["episodes"] == 2


def test_trainable_column_appears_when_a_row_states_it(tmp_path):
  seeds = {"0": [_summary(tmp_path / "a.json", {"seen": (3, 4)})]}
  rows = [{"label": "frozen", "command": "c", "seeds": seeds, "cells": compare.row_cells(seeds),
           "trainable": "1.29%"},
          {"label": "other", "command": "c", "seeds": seeds, "cells": compare.row_cells(seeds)}]
  lines = compare.table(rows, ["seen"]).splitlines()
  assert lines[0] == "| row | seeds | trainable | seen |" and lines[1] == "|---|---|---|---|"
  assert lines[2].startswith("| frozen | 1 | 1.29% | **0.750**")
  assert lines[3].startswith("| other | 1 | — | **0.750**")
  assert compare.table(rows[1:], ["seen"]).splitlines()[0] == "| row | seeds | seen |"


def test_latency_column_is_the_median_over_seeds(tmp_path):
  def timed(name, median_ms, batch=8):
    path = tmp_path / name
    path.write_text(json.dumps({"variants": {"seen": {"mean_success": 0.5, "episodes": 2}},
                                "policy_latency": {"batch_size": batch, "median_ms": median_ms}}))
    return str(path)
  seeds = {"0": [timed("a.json", 300.0)], "1": [timed("b.json", 100.0)], "2": [timed("c.json", 250.0)]}
  assert compare.row_latency(seeds) == {"median_ms": 250.0, "batch_size": 8, "seeds": 3}
  untimed = {"0": [_summary(tmp_path / "d.json", {"seen": (1, 2)})]}
  assert compare.row_latency(untimed) is None
  rows = [{"label": "timed", "command": "c", "seeds": seeds, "cells": compare.row_cells(seeds),
           "latency": compare.row_latency(seeds)},
          {"label": "untimed", "command": "c", "seeds": untimed, "cells": compare.row_cells(untimed),
           "latency": None}]
  lines = compare.table(rows, ["seen"]).splitlines()
  assert lines[0] == "| row | seeds | policy call (median) | seen |"
  assert lines[2].startswith("| timed | 3 | 250 ms at batch 8 | ") and lines[3].startswith("| untimed | 1 | — |")
  seeds["3"] = untimed["0"]                       # a seed evaluated before latency was recorded
  rows[0]["latency"] = compare.row_latency(seeds)
  assert "| 250 ms at batch 8 (3 of 4 seeds) |" in compare.table(rows, ["seen"])
  with pytest.raises(ValueError, match="different batch sizes"):
    compare.row_latency({"0": [timed("e.json", 1.0, 8)], "1": [timed("f.json", 1.0, 1)]})
