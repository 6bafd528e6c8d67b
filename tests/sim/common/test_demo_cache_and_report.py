"""What the simulator workflows share (sim/common/): the demo cache and the closed-loop report.

References: Wilson bounds as the roots of their defining quadratic (numpy) and worked by hand; the
report table's intervals computed by hand below; the cache's reuse decided by files on disk.
"""
import json
import logging
import os

import numpy as np
import pytest

from m2vla_jax.sim.common import demo_cache
from m2vla_jax.evaluation import summary as summary_lib

SPEC = {"simulator": "test", "tasks": ("a", "b"), "episodes_per_task": 2, "noise": 0.3}


def _builder(data_dir, name, calls):
  """A stand-in recording: the files the cache looks at, plus a shard that must not outlive it."""
  def build():
    calls.append(name)
    path = demo_cache.dataset_dir(data_dir, name)
    os.makedirs(path)
    open(os.path.join(path, "dataset_info.json"), "w").write("{}")
    open(os.path.join(path, f"shard-{len(calls)}"), "w").write("x")
    return path, {"recording": len(calls)}
  return build


def test_cache_name_is_a_prefix_and_a_hash_of_the_whole_spec():
  name = demo_cache.cache_name("Test_AB", SPEC)
  assert name == "test_ab_" + demo_cache.digest(SPEC) and len(demo_cache.digest(SPEC)) == 10
  # the same spec however it is spelled (key order, tuples or lists) is the same name
  respelled = dict(reversed(list({**SPEC, "tasks": ["a", "b"]}.items())))
  assert demo_cache.cache_name("test_ab", respelled) == name
  for key, value in [("tasks", ("b", "a")), ("episodes_per_task", 3), ("noise", 0.30001),
                     ("new", 1)]:
    assert demo_cache.cache_name("test_ab", {**SPEC, key: value}) != name, key
  with pytest.raises(ValueError, match="not JSON-able"):
    demo_cache.cache_name("x", {"seed": object()})
  with pytest.raises(ValueError, match="prefix is empty"):
    demo_cache.cache_name("", SPEC)
  with pytest.raises(ValueError, match=r"config.x.dataset_name='old' does not match the "
                                       r"demonstration settings \('new'\); derive it"):
    demo_cache.check_name("config.x.dataset_name", "old", "new", "derive it")


def test_ensure_records_once_reuses_and_rebuilds_another_spec(tmp_path, caplog):
  data_dir, calls = str(tmp_path), []
  name = demo_cache.cache_name("test", SPEC)
  path, report = demo_cache.ensure(data_dir, name, SPEC, _builder(data_dir, name, calls))
  assert path == str(tmp_path / name / "1.0.0") and report == {"recording": 1}
  assert json.load(open(os.path.join(path, demo_cache.SPEC_FILE))) == {**SPEC, "tasks": ["a", "b"]}
  assert demo_cache.ensure(data_dir, name, SPEC, _builder(data_dir, name, calls)) == (path, None)
  assert calls == [name]
  # The same name asked for another spec (a hand-chosen name): rebuilt, saying which field differs,
  # and nothing of the first recording is left.
  other = {**SPEC, "episodes_per_task": 5}
  with caplog.at_level(logging.WARNING):
    assert demo_cache.ensure(data_dir, name, other, _builder(data_dir, name, calls)) == (
        path, {"recording": 2})
  assert ("recorded for another spec (episodes_per_task: cached 2, wanted 5); rebuilding"
          in caplog.text)
  assert sorted(os.listdir(path)) == ["dataset_info.json", demo_cache.SPEC_FILE, "shard-2"]
  assert demo_cache.lookup(data_dir, name, other) == path
  assert demo_cache.lookup(data_dir, name, SPEC) is None


def test_ensure_rebuilds_a_cache_without_spec_or_unfinished(tmp_path, caplog):
  data_dir, calls = str(tmp_path), []
  # written before specs were saved (or interrupted before the spec): data but no spec file
  path = demo_cache.dataset_dir(data_dir, "old")
  os.makedirs(path)
  open(os.path.join(path, "dataset_info.json"), "w").write("{}")
  with caplog.at_level(logging.WARNING):
    assert demo_cache.ensure(data_dir, "old", SPEC, _builder(data_dir, "old", calls))[1] is not None
  assert f"has no {demo_cache.SPEC_FILE}" in caplog.text
  # a directory without dataset_info.json: an interrupted write
  os.makedirs(os.path.join(data_dir, "cut", "1.0.0"))
  with caplog.at_level(logging.WARNING):
    assert demo_cache.ensure(data_dir, "cut", SPEC, _builder(data_dir, "cut", calls))[1] is not None
  assert "is incomplete (no dataset_info.json)" in caplog.text
  assert calls == ["old", "cut"]
  # a build that writes somewhere else would leave the cache empty: refused, naming both places
  with pytest.raises(RuntimeError, match="not to the cache directory"):
    demo_cache.ensure(data_dir, "elsewhere", SPEC, _builder(data_dir, "other_place", []))


def test_dataset_spec_and_register():
  from m2vla_jax.data import oxe  # pylint: disable=g-import-not-at-top
  demo_cache.register("test_sim_common_demos", {"primary": "image", "wrist": "wrist_image"})
  spec = oxe.get_spec("test_sim_common_demos")
  assert dict(spec.cameras) == {"primary": "image", "wrist": "wrist_image"}
  assert spec.action_encoding == oxe.ActionEncoding.EEF_DELTA


def test_wilson_interval_matches_hand_computation():
  # Hand computation: the Wilson bounds are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n,
  # i.e. (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0, solved with numpy's polynomial roots.
  z = 1.959963984540054
  for k, n in [(8, 10), (0, 20), (20, 20), (37, 50), (1, 3)]:
    ph = k / n
    roots = np.sort(np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph]).real)
    lo, hi = summary_lib.wilson_interval(k, n)
    np.testing.assert_allclose([lo, hi], np.clip(roots, 0, 1), atol=1e-12)
  # Worked by hand for 8/10: center (0.8 + z^2/20) / (1 + z^2/10) = 0.71673, half-width
  # z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.22658.
  np.testing.assert_allclose(summary_lib.wilson_interval(8, 10), (0.4902, 0.9433), atol=1e-4)
  assert summary_lib.wilson_interval(0, 0) == (0.0, 1.0)


def _episodes():
  ok = [dict(task="a", success=True, reason="success")] * 2
  return ok + [dict(task="b", success=False, reason="timeout"),
               dict(task="b", success=False, reason="env_error: boom")]


def test_report_table_and_run_summary(tmp_path):
  result = summary_lib.summarize(_episodes())
  assert result["per_task"]["b"]["failures"] == {"timeout": 1, "env_error": 1}
  result["named_block_closest"] = 0.75
  result["per_task"]["a"]["named_block_closest"] = 0.5
  # By hand (z^2 = 3.8415): 2/2 -> center 1.9604 / 2.9207 = 0.6712, half 0.3288: 0.34-1.00;
  # 0/2 -> 0.00-0.66; pooled 2/4 -> center 0.5, half 0.3500: 0.15-0.85.
  table = summary_lib.markdown({"seen": result}, "variant", {"closest": "named_block_closest"})
  assert table.splitlines() == [
      "| variant | task | success | episodes | 95% CI | closest |",
      "|---|---|---|---|---|---|",
      "| seen | a | 2/2 (1.00) | 2 | 0.34-1.00 | 0.50 |",
      "| seen | b | 0/2 (0.00) | 2 | 0.00-0.66 | - |",
      "| **seen** | **mean** | **0.500** | 4 | 0.15-0.85 | 0.75 |"]
  assert summary_lib.markdown({"seen": result}, "variant").splitlines()[2] == (
      "| seen | a | 2/2 (1.00) | 2 | 0.34-1.00 |")
  assert summary_lib.headline("mt10 seen", result, 12.4) == (
      "mt10 seen: mean success 0.500 (95% CI 0.15-0.85, 4 episodes, 12s)")
  summary = summary_lib.run_summary("/w", "demos", ("a", "b"), "rollout", {"compiled": result},
                                    {"load_policy": 1.0}, extra=("named_block_closest", "absent"),
                                    seed=3)
  assert list(summary) == ["workdir", "dataset", "tasks", "seed", "rollouts", "wall_s"]
  entry = summary["rollouts"]["compiled"]
  assert entry["named_block_closest"] == 0.75 and entry["absent"] is None
  assert entry["per_task"]["b"] == {"successes": 0, "episodes": 2, "success_rate": 0.0,
                                    "ci95": list(summary_lib.wilson_interval(0, 2))}
  summary_lib.write_run_summary(str(tmp_path / "out"), summary, table)
  assert json.load(open(tmp_path / "out" / "summary.json")) == json.loads(json.dumps(summary))
  assert (tmp_path / "out" / "summary.md").read_text() == table


def test_evaluation_files_and_a_plot_of_rates_zero_and_one(tmp_path):
  result = summary_lib.summarize(_episodes())
  summary_lib.write_evaluation(result, str(tmp_path), "mt10_seen")
  assert json.load(open(tmp_path / "mt10_seen.json"))["mean_success"] == 0.5
  assert (tmp_path / "mt10_seen.png").stat().st_size > 1000
  # Rounded Wilson ends can fall past a rate of 0 or 1; the plot must not raise on it.
  summary = {"per_task": {"a": {"success_rate": 1.0, "ci95": [0.8, 0.9999]},
                          "b": {"success_rate": 0.0, "ci95": [0.0001, 0.2]}}, "mean_success": 0.5}
  path = tmp_path / "plot.png"
  summary_lib.plot_success(summary, str(path))
  assert path.stat().st_size > 1000


def test_policy_latency_drops_each_batch_sizes_compiling_call():
  # Worked by hand: batch 8 was called 5 times; its first call (2.0 s, the compile) is reported apart,
  # the other four (0.10, 0.30, 0.20, 0.40 s) give median 250 ms and p90 370 ms (numpy's linear
  # interpolation: 0.30 + 0.7 * (0.40 - 0.30)); batch 3's two calls are the minority and are left out.
  calls = [(8, 2.0), (8, 0.1), (3, 1.5), (8, 0.3), (8, 0.2), (3, 0.05), (8, 0.4)]
  lat = summary_lib.policy_latency(calls)
  assert lat["batch_size"] == 8 and lat["calls"] == 4 and lat["first_call_s"] == 2.0
  np.testing.assert_allclose([lat["median_ms"], lat["p90_ms"]], [250.0, 370.0], rtol=1e-12)
  assert summary_lib.policy_latency([(8, 2.0)]) is None      # only the compiling call: nothing to say
  assert summary_lib.policy_latency([]) is None
