"""Closed-loop simulation: Meta-World demonstrations and evaluation, MJX compiled rollouts."""
