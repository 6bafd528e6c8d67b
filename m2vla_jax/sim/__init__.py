"""Closed-loop simulation: Meta-World (`metaworld/`), MJX compiled rollouts (`mjx/`), LIBERO (`libero/`).

What they share (run phases, demonstration cache, worker process, policy adapter) is `common/`.
"""
