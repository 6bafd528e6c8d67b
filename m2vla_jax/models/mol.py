"""Mixture-of-Layers attention (M²-VLA eqs. 5-9): how one action-head block reads one VLM layer.

The latents `A_{l-1}` of the head give the queries `Q_A`. Three branches, each with its OWN softmax:

  branch S  keys/values from the query-token states S'_l (+ the projected proprio token); the logits are
            scaled per head by the input-dependent gate  alpha_S = sigmoid(W_S pool(S'_l))      (5, 6)
  branch V  keys/values from the visual states V'_l; logits scaled by a learnable scalar alpha_v   (7)
  branch A  self-attention on the latents                                                          (8)

and the result is their mean (9). With `mol=False` (the ablation) the same projections feed ONE softmax
over the concatenated keys [S; V; A] with no gates: plain attention to the same layer's tokens.

The output is in head space `[B, N, heads, head_dim]`; the caller (the head block) adds the MSM branch
(eqs. 12-13, `msm.MemoryAttention`) in the same space before the shared output projection.

Choices the paper leaves open (ours, documented on the fields of `action_head.HeadConfig`):
  * pool(S'_l) is the masked mean over the query tokens only (the proprio token is not pooled), taken
    after the block's context LayerNorm (raw Gemma states grow in norm with depth);
  * alpha_v is a raw scalar (not squashed), initialised to `alpha_v_init` = 1.0 so branch V starts as
    standard attention;
  * a branch whose keys are all masked (e.g. every camera absent) contributes zero; the mean still
    divides by three so the scale of the sum does not jump with missing inputs.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Large negative logit for masked keys (finite so a fully masked row does not produce NaN).
_MASK_VALUE = -1e30


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over axis 1 of x [B, N, D] where mask [B, N] is True; zeros where nothing is valid."""
  m = mask.astype(x.dtype)[..., None]
  return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           logit_scale: jax.Array | float = 1.0) -> jax.Array:
  """softmax(scale * q k^T / sqrt(d)) v with key mask; zero output for rows with no valid key.

  Args:
    q: [B, N, h, d] queries.
    k, v: [B, M, h, d] keys and values.
    mask: [B, M] True for valid keys.
    logit_scale: scalar or [B, h] multiplier of the logits (the MoL gates).
  Returns:
    [B, N, h, d].
  """
  depth = q.shape[-1]
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) / jnp.sqrt(depth).astype(q.dtype)
  scale = jnp.asarray(logit_scale, logits.dtype)
  if scale.ndim == 2:  # [B, h] head-wise gates
    scale = scale[:, :, None, None]
  logits = logits * scale
  logits = jnp.where(mask[:, None, None, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jnp.einsum("bhnm,bmhd->bnhd", probs, v)
  has_key = mask.any(axis=-1)[:, None, None, None]
  return jnp.where(has_key, out, 0.0)


class MoLAttention(nn.Module):
  """Eqs. 5-9 for one block. Queries are computed by the caller (shared with the MSM branch).

  Attributes:
    num_heads, head_dim: attention geometry (must match `q`).
    alpha_v_init: initial value of the scalar visual gate alpha_v (ours: 1.0).
    mol: False selects the ablation (one softmax over [S; V; A], no gates).
    dtype: computation dtype.
  """
  num_heads: int
  head_dim: int
  alpha_v_init: float = 1.0
  mol: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, x: jax.Array, ctx_s: jax.Array, ctx_s_mask: jax.Array,
               gate_src: jax.Array, gate_mask: jax.Array, ctx_v: jax.Array, ctx_v_mask: jax.Array,
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mixture-of-Layers attention.

    Args:
      q: [B, N, h, d] queries Q_A from the (normed) latents.
      x: [B, N, D] normed latents A_{l-1} (keys/values of branch A).
      ctx_s: [B, Ns, Dv] query-branch context: S'_l joined with the proprio token(s), normed.
      ctx_s_mask: [B, Ns].
      gate_src: [B, Nq, Dv] S'_l (normed) pooled for the head-wise gate alpha_S.
      gate_mask: [B, Nq].
      ctx_v: [B, Nv, Dv] visual states V'_l, normed.
      ctx_v_mask: [B, Nv] False for tokens of absent cameras.
    Returns:
      (out [B, N, h, d], gates {'alpha_s': [B, h], 'alpha_v': []}); gates are empty with mol=False.
    """
    proj = lambda name: nn.DenseGeneral((self.num_heads, self.head_dim), dtype=self.dtype, name=name)
    k_s, v_s = proj("key_s")(ctx_s), proj("value_s")(ctx_s)
    k_v, v_v = proj("key_v")(ctx_v), proj("value_v")(ctx_v)
    k_a, v_a = proj("key_a")(x), proj("value_a")(x)
    mask_a = jnp.ones(x.shape[:2], bool)

    if not self.mol:
      k = jnp.concatenate([k_s, k_v, k_a], axis=1)
      v = jnp.concatenate([v_s, v_v, v_a], axis=1)
      mask = jnp.concatenate([ctx_s_mask, ctx_v_mask, mask_a], axis=1)
      return attend(q, k, v, mask), {}

    pooled = masked_mean(gate_src, gate_mask)                                   # [B, Dv]
    alpha_s = nn.sigmoid(nn.Dense(self.num_heads, dtype=self.dtype, name="gate_s")(pooled))  # [B, h]
    alpha_v = self.param("alpha_v", nn.initializers.constant(self.alpha_v_init), (), jnp.float32)
    a_s = attend(q, k_s, v_s, ctx_s_mask, alpha_s)
    a_v = attend(q, k_v, v_v, ctx_v_mask, alpha_v)
    a_a = attend(q, k_a, v_a, mask_a)
    return (a_s + a_v + a_a) / 3.0, {"alpha_s": alpha_s, "alpha_v": alpha_v}
