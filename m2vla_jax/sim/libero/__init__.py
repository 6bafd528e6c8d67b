"""LIBERO, the M²-VLA paper's headline benchmark, under the evaluation protocol others report.

Owns: `env` (one LIBERO task under the OpenVLA / openpi evaluation protocol: rotated agentview and
wrist images, the 8-d state, 7-d delta end-effector actions, no-op steps, per-suite step limits,
the suite's benchmark init states, success from the task's predicate), run in its own process.

LIBERO is an optional extra (`pip install -e .[libero]`); nothing here imports it until an
environment is built, so the package imports without it.
"""
