"""m2vla_jax: M²-VLA and sibling vision-language-action policies in JAX/Flax.

Packages, from the inside out:
  models/      the frozen SigLIP + Gemma backbone, the M²-VLA action head (MoL, MSM) and the policy.
  weights/     importers for released checkpoints (big_vision .npz, Hugging Face, GGUF).
  data/        Open X-Embodiment RLDS reading, standardization, statistics, transforms, grain pipeline.
  training/    freezing rules, optimizer, sharding, checkpoints and the train step.
  evaluation/  offline evaluation over RLDS episodes.
  sim/         closed-loop simulation (Meta-World, MJX).
"""

__version__ = "0.1.0"
