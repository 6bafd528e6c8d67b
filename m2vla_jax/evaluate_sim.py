"""Entry point: closed-loop Meta-World evaluation of a policy checkpoint (or a reference policy).

    python -m m2vla_jax.evaluate_sim --checkpoint=/path/to/export --suite=mt10 --out=/tmp/eval
    python -m m2vla_jax.evaluate_sim --policy=expert --suite=mt10 --episodes_per_task=10
    python -m m2vla_jax.evaluate_sim --server=ws://127.0.0.1:8000 --suite=mt10   # python -m m2vla_jax.serve

Writes, per variant (`seen`, `paraphrased`, `held_out_tasks`), `<suite>_<variant>.json` (per-task and
mean success with 95% Wilson intervals and every episode), a bar plot and a few rollout GIFs; see
`m2vla_jax.sim.metaworld.evaluate` for the policy contract and the scoring.

`--checkpoint` is an export bundle (`python -m m2vla_jax.export`) or a training run directory (its newest
checkpoint); either is wrapped by `sim.common.policy_adapter.SimPolicyAdapter`, which turns the raw
simulator observation into the model's (resize, training tokenizer, state statistics) and the
model's normalized actions back into Meta-World units.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from m2vla_jax.sim.metaworld import evaluate as evaluate_metaworld
from m2vla_jax.sim.metaworld import env as metaworld_env


def make_policy(kind: str, checkpoint: str | None, horizon: int, server: str | None = None,
                token: str | None = None):
  """The policy callable: a checkpoint via `m2vla_jax.inference.load_policy`, a policy server, or a
  reference."""
  if kind == "server" or (server and kind == "checkpoint" and not checkpoint):
    if not server:
      raise ValueError("--server=ws://host:port is required with --policy=server")
    from m2vla_jax.serving import client  # pylint: disable=g-import-not-at-top
    return client.RemotePolicy(server, token)
  if kind == "checkpoint":
    if not checkpoint:
      raise ValueError("--checkpoint is required with --policy=checkpoint (or use --policy=expert "
                       "or --policy=random for reference numbers)")
    from m2vla_jax.sim.common import policy_adapter  # pylint: disable=g-import-not-at-top
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
      return policy_adapter.SimPolicyAdapter.from_workdir(checkpoint)
    return policy_adapter.SimPolicyAdapter.from_bundle(checkpoint)
  if kind == "expert":
    return evaluate_metaworld.ExpertChunkPolicy(horizon)
  if kind == "random":
    return evaluate_metaworld.RandomChunkPolicy(horizon)
  raise ValueError(f"--policy={kind!r}; use checkpoint, server, expert or random")


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--checkpoint", default=None, help="export bundle or training run directory")
  parser.add_argument("--policy", default="checkpoint", choices=("checkpoint", "server", "expert", "random"))
  parser.add_argument("--server", default=None, help="policy server ws://host:port (python -m m2vla_jax.serve)")
  parser.add_argument("--token", default=None, help="the policy server's shared token, if it has one")
  parser.add_argument("--suite", default="mt10", choices=sorted(metaworld_env.SUITES))
  parser.add_argument("--variants", default=",".join(evaluate_metaworld.VARIANTS),
                      help="comma-separated subset of " + ",".join(evaluate_metaworld.VARIANTS))
  parser.add_argument("--episodes_per_task", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--execute_steps", type=int, default=4,
                      help="actions of each chunk executed open-loop before re-planning")
  parser.add_argument("--reference_horizon", type=int, default=4,
                      help="chunk length of the expert / random reference policies")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--primary_camera", default="corner")
  parser.add_argument("--wrist_camera", default="gripperPOV", help="'' for none")
  parser.add_argument("--num_videos", type=int, default=3)
  parser.add_argument("--out", default="/tmp/m2vla_eval_sim")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  config = evaluate_metaworld.EvalConfig(
      env=metaworld_env.EnvConfig(image_size=args.image_size, primary_camera=args.primary_camera,
                                  wrist_camera=args.wrist_camera or None),
      episodes_per_task=args.episodes_per_task, batch_size=args.batch_size,
      execute_steps=args.execute_steps, num_videos=args.num_videos)
  policy = make_policy(args.policy, args.checkpoint, args.reference_horizon, args.server, args.token)
  variants = [v for v in args.variants.split(",") if v]
  results = evaluate_metaworld.evaluate_variants(policy, args.suite, config, args.out, variants)
  summary = {v: {"mean_success": r["mean_success"], "mean_ci95": r["mean_ci95"],
                 "episodes": r["episodes"]} for v, r in results.items()}
  with open(os.path.join(args.out, f"{args.suite}_summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  for v, r in summary.items():
    lo, hi = r["mean_ci95"]
    print(f"{args.suite} {v}: mean success {r['mean_success']:.3f} (95% CI {lo:.3f}-{hi:.3f}, "
          f"{r['episodes']} episodes)")
  return results


def cli():
  """Console script `m2vla-evaluate-sim`."""
  main(sys.argv[1:])


if __name__ == "__main__":
  cli()
