"""Meta-World: scripted-expert demonstrations, the closed-loop benchmark and the sim workflow.

Owns: `env` (one Meta-World task with fast cameras and image rendering, run in its own process),
`instructions` (the tasks' instructions and paraphrases), `demos` (expert demonstrations as RLDS),
`visual_shift` (appearance changes never seen in training), `evaluate` (the closed loop scored the
benchmark's way) and `workflow` (demos -> train -> evaluate, the `sim` section of a config).
"""
