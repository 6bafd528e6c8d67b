"""What every simulator's workflow shares: the run phases, the demonstration cache, the worker process.

`phases` (prepare -> train -> evaluate, timed), `demo_cache` (one naming scheme for recorded
demonstrations, their generation spec saved beside the data, their data-registry entry), `worker`
(an environment in its own process), `policy_adapter` (a policy behind a simulator's raw
observations) and `compare` (runs side by side). The closed loop and the scoring are
`evaluation/`'s. A simulator folder (`sim/metaworld/`, `sim/mjx/`, `sim/libero/`) brings its own
environments, experts and the `evaluation.closed_loop.Simulator` of its envs.
"""
