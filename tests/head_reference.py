"""numpy float64 reference of one M²-VLA head block (MoL eqs. 5-9 + MSM eqs. 12-13), shared by tests."""
import numpy as np


def layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
  """Dense / DenseGeneral with kernel [Din, ...] (or [h, d, Dout] for the out projection)."""
  k = p["kernel"]
  return np.tensordot(x, k, axes=1) + p["bias"]


def attend(q, k, v, mask, scale=None):
  """q [B,N,h,d], k/v [B,M,h,d], mask [B,M], scale None | scalar | [B,h] -> [B,N,h,d]."""
  out = np.zeros(q.shape)
  d = q.shape[-1]
  for b in range(q.shape[0]):
    valid = np.flatnonzero(mask[b])
    if valid.size == 0:
      continue
    for h in range(q.shape[2]):
      s = 1.0 if scale is None else (scale if np.ndim(scale) == 0 else scale[b, h])
      logits = s * (q[b, :, h] @ k[b, valid, h].T) / np.sqrt(d)
      logits -= logits.max(-1, keepdims=True)
      w = np.exp(logits)
      w /= w.sum(-1, keepdims=True)
      out[b, :, h] = w @ v[b, valid, h]
  return out


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def mol(p, q, h, ctx_s, ctx_s_mask, gate_src, gate_mask, ctx_v, ctx_v_mask, use_mol=True):
  ks, vs = dense(ctx_s, p["key_s"]), dense(ctx_s, p["value_s"])
  kv, vv = dense(ctx_v, p["key_v"]), dense(ctx_v, p["value_v"])
  ka, va = dense(h, p["key_a"]), dense(h, p["value_a"])
  mask_a = np.ones(h.shape[:2], bool)
  if not use_mol:
    return attend(q, np.concatenate([ks, kv, ka], 1), np.concatenate([vs, vv, va], 1),
                  np.concatenate([ctx_s_mask, ctx_v_mask, mask_a], 1)), None
  m = gate_mask[..., None].astype(float)
  pooled = (gate_src * m).sum(1) / np.maximum(m.sum(1), 1.0)
  alpha_s = sigmoid(dense(pooled, p["gate_s"]))
  alpha_v = float(p["alpha_v"])
  out = (attend(q, ks, vs, ctx_s_mask, alpha_s) + attend(q, kv, vv, ctx_v_mask, alpha_v)
         + attend(q, ka, va, mask_a)) / 3.0
  return out, alpha_s


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def head_block(p, x, visual, query, visual_mask, query_mask, proprio, mem_tokens, mem_mask,
               use_mol=True, use_msm=True):
  """Returns (A_l, alpha_s) for one block, in float64."""
  p = {k: v for k, v in p.items()}
  h = layer_norm(x, p["LayerNorm_0"])
  q = dense(h, p["query"])
  ctx_s = layer_norm(np.concatenate([query, proprio], 1), p["LayerNorm_s"])
  ctx_s_mask = np.concatenate([query_mask, np.ones(proprio.shape[:2], bool)], 1)
  ctx_v = layer_norm(visual, p["LayerNorm_v"])
  out, alpha_s = mol(p["MoL"], q, h, ctx_s, ctx_s_mask, ctx_s[:, :query.shape[1]], query_mask, ctx_v,
                     visual_mask, use_mol)
  if use_msm:
    km, vm = dense(mem_tokens, p["MSM"]["key_m"]), dense(mem_tokens, p["MSM"]["value_m"])
    out = out + attend(q, km, vm, mem_mask)
  x = x + np.tensordot(out, p["out"]["kernel"], axes=2) + p["out"]["bias"]
  y = layer_norm(x, p["LayerNorm_1"])
  y = gelu_tanh(dense(y, p["MlpBlock"]["Dense_0"]))
  return x + dense(y, p["MlpBlock"]["Dense_1"]), alpha_s
