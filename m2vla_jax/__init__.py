"""m2vla_jax: M²-VLA and sibling vision-language-action policies in JAX/Flax.

Packages, bottom up (imports point only down; tests/test_layers.py checks it):
  core/        parameter-path trees, freezing rules, dtype table, name -> object registries.
  models/      neural modules: the SigLIP + Gemma backbone, Mixture of Layers, MSM, the action head.
  policies/    a model plus its contract with trainer and inference (M²-VLA, the toy), and their registry.
  text/        tokenizers (Gemma SentencePiece, GGUF-embedded, closed word vocabularies).
  weights/     importers for released checkpoints (big_vision .npz, Hugging Face, GGUF).
  data/        Open X-Embodiment RLDS reading, standardization, statistics, transforms, grain pipeline.
  training/    config validation, optimizer, sharding, checkpoints and the train loop.
  inference/   restore without an optimizer, the one observation -> action path, bundles.
  evaluation/  offline evaluation over RLDS episodes.
  sim/         closed-loop simulation (Meta-World, MJX).
"""

__version__ = "0.1.0"
