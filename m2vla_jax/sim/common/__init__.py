"""What every simulator's workflow shares: the run phases, the demonstration cache, the report.

`phases` (prepare -> train -> evaluate, timed), `demo_cache` (one naming scheme for recorded
demonstrations, their generation spec saved beside the data, their data-registry entry) and
`summary` (Wilson intervals, per-task summaries, the report files). A simulator folder (Meta-World
in `sim/`, `sim/mjx/`) brings its own environments, experts and evaluation loop.
"""
