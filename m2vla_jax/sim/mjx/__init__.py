"""XLA-compiled closed-loop tabletop simulation in MJX: scene, tasks, experts, renderer, rollouts.

Everything from reset to success scoring runs in one jitted program (`rollout.rollout`); see
`scene` for the physics settings that keep batched MJX stepping fast and hang-free on CPU.
`c_rollout` plays the same episodes with C MuJoCo physics (the reference), `policy` wraps a
trained M²-VLA as the rollouts' policy, `workflow` runs demos -> training -> both evaluations
(results in docs/results/mjx_runs.md).
"""
