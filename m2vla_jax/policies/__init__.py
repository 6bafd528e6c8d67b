"""Policies: a model plus its contract with the trainer and inference (`registry.py` says what a policy
provides). One file per policy and one line in `registry.POLICIES`:

  m2vla.py   M²-VLA: frozen VLM, Mixture of Layers, Meta Skill Module, denoising head
  mole_vla.py  MoLe-VLA: per-sample layer skipping (STAR router), CogKD; M²-VLA's head and contract
  toy.py     a tiny policy with the same parameter split, for seconds-long runs and tests
"""
