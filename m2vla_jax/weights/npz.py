"""big_vision `.npz` checkpoints: read (local or remote, float32 or bf16) and write, in big_vision's layout.

Owns the file format only; fitting the arrays to a model (missing / unexpected / mis-shaped keys) is
`weights.merge.merge_params`. A big_vision checkpoint is an `np.savez` archive whose member names are the
'/'-joined parameter paths under a top-level `params/`, e.g. for PaliGemma:

  params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel   [L, W, F]   (scanned: layer axis first)
  params/llm/layers/attn/q_einsum/w                                [L, N, D, H]
  params/llm/embedder/input_embedding                              [V, D]

bfloat16: numpy has no bfloat16, so `np.savez` of a bf16 array (an `ml_dtypes.bfloat16` array, which is
what `np.asarray` of a jax bf16 array gives) stores the raw 2-byte records with dtype descriptor `|V2`
(numpy "void"). big_vision's `recover_dtype` views such members back as bfloat16; we do the same, and
write bf16 the same way, so our bf16 files load in big_vision and theirs in ours.

Paths may be local or any `tf.io.gfile` URL (`gs://bucket/ckpt.npz`); a `:subtree` suffix selects a
sub-tree as big_vision's `load_params` does (`gs://b/paligemma.npz:img` loads only the image encoder, and
the reference tree is then the SigLIP tree). Pickled (object) members are always refused: loading a
pickle runs arbitrary code.
"""
from __future__ import annotations

import io
import os
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

from m2vla_jax.core import tree_util
from m2vla_jax.weights import merge

# 'file.npz:img/head' -> ('file.npz', 'img/head'). The selector must follow '.npz' so that 'gs://...' and
# Windows-free local paths with ':' elsewhere are left alone.
_SUBTREE_RE = re.compile(r"^(?P<file>.*\.npz)(?::(?P<key>[\w/]+))?$")


def split_subtree(path: str) -> tuple[str, str | None]:
  """'ckpt.npz:img' -> ('ckpt.npz', 'img'); 'ckpt.npz' -> ('ckpt.npz', None)."""
  match = _SUBTREE_RE.match(path)
  if match is None:
    return path, None
  return match.group("file"), match.group("key")


def _is_local(path: str) -> bool:
  return "://" not in path


def _recover_dtype(name: str, array: np.ndarray) -> np.ndarray:
  """Views big_vision's void-typed bf16 members as bfloat16 (see module docstring)."""
  if array.dtype.type is np.void:
    if array.dtype.itemsize != 2:
      raise ValueError(f"npz member {name!r} has an opaque dtype {array.dtype} of {array.dtype.itemsize} "
                       f"bytes; only 2-byte void members (big_vision's bfloat16) are understood")
    return array.view(ml_dtypes.bfloat16)
  return array


def _open_archive(path: str):
  """np.load of a local path (lazy: members are read on access) or a tf.io.gfile URL (read whole)."""
  if _is_local(path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"npz checkpoint {path!r} does not exist")
    archive = np.load(path, allow_pickle=False)
  else:
    # np.load needs a seekable file; remote files are read whole, as big_vision's `npload` does.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (heavy; only for remote paths)
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"npz checkpoint {path!r} does not exist")
    with tf.io.gfile.GFile(path, "rb") as f:
      archive = np.load(io.BytesIO(f.read()), allow_pickle=False)
  if isinstance(archive, np.ndarray):
    raise ValueError(f"{path!r} holds a single array (np.save), not an np.savez archive of named "
                     f"parameters")
  return archive


def read_npz(path: str, prefix: str = "") -> dict[str, np.ndarray]:
  """Members of an `.npz` (local or remote) as {name: array}; bf16 recovered, pickles refused.

  Args:
    path: local path or tf.io.gfile URL, without a ':subtree' suffix.
    prefix: only members whose names start with it are read (a local archive is read lazily, so
      loading 'params/img/' from a 3B checkpoint does not read the language model).
  """
  archive = _open_archive(path)
  out = {}
  with archive:
    for name in archive.files:
      if not name.startswith(prefix):
        continue
      try:
        value = archive[name]
      except ValueError as e:
        # numpy raises this for object members when allow_pickle=False.
        raise ValueError(f"{path!r} member {name!r} is a pickled object array; refusing to unpickle "
                         f"it (pickles can run arbitrary code). Re-save it as a numeric array.") from e
      out[name] = _recover_dtype(name, value)
  return out


def load_npz(path: str, reference_params: Any, *, prefix: str = "params/", missing_ok: str | None = None,
             dtype: Any = None) -> dict:
  """Loads a big_vision `.npz` into the tree of `reference_params`, checking every key.

  Args:
    path: local path or tf.io.gfile URL, optionally with a ':subtree' selector ('ckpt.npz:llm').
    reference_params: the model's parameter tree (arrays or `jax.ShapeDtypeStruct`s, e.g. from
      `jax.eval_shape(model.init, ...)`), rooted at the selected sub-tree.
    prefix: members whose names start with this are the parameters; others (e.g. optimizer state) are
      ignored. The prefix and the sub-tree are stripped from member names.
    missing_ok: regex (full match) of reference paths allowed to be absent (they keep their reference
      value), e.g. 'queries' when loading a plain PaliGemma checkpoint into a VLM with query tokens.
    dtype: if given, every returned leaf is cast to it; else each leaf takes its reference dtype.

  Returns:
    A tree shaped like `reference_params` holding numpy arrays (or the reference leaves for
    `missing_ok` paths).

  Raises:
    merge.CheckpointMismatchError: missing, unexpected or mis-shaped keys, all named.
    ValueError: no member under the prefix / sub-tree, or a pickled member.
  """
  file, subtree = split_subtree(path)
  full_prefix = prefix + (subtree.strip("/") + "/" if subtree else "")
  flat = {name[len(full_prefix):]: value for name, value in read_npz(file, full_prefix).items()}
  if not flat:
    with _open_archive(file) as archive:
      tops = sorted({"/".join(name.split("/")[:2]) for name in archive.files})
    raise ValueError(f"{path!r} has no member under {full_prefix!r} (prefix={prefix!r}, sub-tree="
                     f"{subtree!r}); its members start with {tops[:20]}")
  params = merge.merge_params(reference_params, flat, missing_ok=missing_ok, source=path)
  if dtype is not None:
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
  return params


def save_npz(path: str, params: Any, *, prefix: str = "params/") -> None:
  """Writes `params` as a big_vision `.npz`: members named prefix + '/'-joined path, bf16 as `|V2`.

  Args:
    path: local path or tf.io.gfile URL (written via an in-memory buffer, then copied).
    params: nested dict of arrays (jax or numpy; bf16 stays bf16).
    prefix: prepended to every member name; big_vision checkpoints use 'params/'.
  """
  flat = {prefix + k: np.asarray(jax.device_get(v)) for k, v in tree_util.flatten(params).items()}
  for name, value in flat.items():
    if value.dtype == object:
      raise ValueError(f"save_npz: leaf {name!r} is an object array; only numeric arrays are saved")
  if _is_local(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Write to a temporary name then rename, so an interrupted save never leaves a truncated checkpoint.
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
    os.replace(tmp, path)
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    with tf.io.gfile.GFile(path, "wb") as f:
      f.write(buffer.getvalue())

