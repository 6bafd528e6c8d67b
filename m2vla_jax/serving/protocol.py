"""The wire format of the policy server: msgpack messages, numpy arrays as explicit {dtype, shape, bytes}.

Owns the encoding both ends share (the client imports it, so it needs only numpy and msgpack). No
pickle anywhere: an array travels as the map `{"__ndarray__": True, "dtype": "<f4", "shape": [...],
"data": <bytes>}`, and decoding accepts only the dtypes in `DTYPES` and a byte count that matches the
shape, so a client cannot make the server build an object or an array larger than the message.

Messages (client -> server), each a msgpack map with a "type":
  {"type": "infer", "observation": {...}, "id": any}   -> {"type": "actions", "actions": f32 [B,H,A_d],
                                                          "infer_ms", "server_ms", "batch_size", "id"}
  {"type": "metadata"}                                  -> {"type": "metadata", ...} (also sent on connect)
  {"type": "health"}                                    -> {"type": "health", "status": "ok", ...}
Any failure is answered {"type": "error", "field": <key or "">, "message": <what and how to fix>, "id"}.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL = "m2vla-serve/1"
TOKEN_HEADER = "X-M2VLA-Token"
HEALTH_PATH = "/healthz"
# Array dtypes a message may carry; anything else (object, void, datetime) is refused at decode.
DTYPES = frozenset(np.dtype(d).str for d in ("bool", "uint8", "int8", "int16", "int32", "int64",
                                             "uint16", "uint32", "float16", "float32", "float64"))
MAX_NDIM = 8


class ProtocolError(ValueError):
  """A message that does not decode; `field` names where (the array's key path, or '')."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _pack_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("="))
    if arr.dtype.str not in DTYPES:
      raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent; use one of {sorted(DTYPES)}")
    return {"__ndarray__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f"cannot encode {type(obj).__name__}; send numpy arrays, numbers, strings, lists, dicts")


def packb(message: Any) -> bytes:
  """A message (dicts, lists, strings, numbers, numpy arrays) -> msgpack bytes."""
  return msgpack.packb(message, default=_pack_default, use_bin_type=True)


def decode_array(m: dict, field: str) -> np.ndarray:
  """{'dtype', 'shape', 'data'} -> a read-only array view; ProtocolError naming `field` if it does not fit."""
  dtype, shape, data = m.get("dtype"), m.get("shape"), m.get("data")
  if not isinstance(dtype, str) or dtype not in DTYPES:
    raise ProtocolError(field, f"{field}: array dtype {dtype!r} is not allowed; use one of {sorted(DTYPES)}")
  if (not isinstance(shape, list) or len(shape) > MAX_NDIM
      or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
    raise ProtocolError(field, f"{field}: array shape {shape!r:.100} is not a list of at most "
                        f"{MAX_NDIM} non-negative ints")
  if not isinstance(data, bytes):
    raise ProtocolError(field, f"{field}: array data must be bytes, got {type(data).__name__}")
  dt = np.dtype(dtype)
  if int(np.prod(shape, dtype=np.int64)) * dt.itemsize != len(data):
    raise ProtocolError(field, f"{field}: array of shape {shape} and dtype {dtype} needs "
                        f"{int(np.prod(shape, dtype=np.int64)) * dt.itemsize} bytes, the message has {len(data)}")
  # frombuffer views the message's bytes (read-only); native byte order for the model.
  return np.frombuffer(data, dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=False)


def _decode(obj: Any, field: str) -> Any:
  if isinstance(obj, dict):
    if obj.get("__ndarray__") is True:
      return decode_array(obj, field)
    return {k: _decode(v, f"{field}.{k}" if field else str(k)) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, f"{field}[{i}]") for i, v in enumerate(obj)]
  return obj


def unpackb(data: bytes) -> Any:
  """msgpack bytes -> a message with numpy arrays; ProtocolError naming the field if it does not decode."""
  if not isinstance(data, (bytes, bytearray)):
    raise ProtocolError("", "messages are binary msgpack frames, got a text frame")
  try:
    # strict_map_key=False keeps int keys legal; no ext types are registered, so none decode.
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
  except Exception as e:  # msgpack raises several unrelated types for corrupt input
    raise ProtocolError("", f"the message is not valid msgpack ({type(e).__name__}: {e})") from e
  return _decode(raw, "")
