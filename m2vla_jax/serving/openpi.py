"""openpi's wire format and observation layouts, so openpi's clients talk to our server unchanged.

Owns: openpi's msgpack-numpy encoding, decoding it with our checks, and the layouts (which keys of an
openpi observation fill which camera slot, the state and the instruction; how our actions become
what that client executes). Written from openpi's published protocol (`openpi_client` 0.1.2:
`msgpack_numpy.py`, `websocket_client_policy.py`; `examples/libero/main.py` for the LIBERO keys):

  - arrays travel as maps with *bytes* keys {b"__ndarray__": True, b"data", b"dtype", b"shape"},
    numpy scalars as {b"__npgeneric__": True, b"data", b"dtype"} (ours, `serving.protocol`, uses
    str keys; both refuse pickle). Decoding accepts only `protocol.DTYPES` and a byte count that
    matches the shape, as ours does;
  - on connect the server sends its metadata (a map); every binary message is then one
    observation, unbatched, answered by one map {"actions": float32 [H, A], "server_timing":
    {"infer_ms": ...}}; an error is answered with a text frame, which openpi's client raises as
    RuntimeError (the connection stays open here);
  - the token travels as "Authorization: Api-Key <token>" (`PolicyServer` accepts it as well as its
    own header).

Layouts (`LAYOUTS`, `--openpi_layout`):
  libero  observation/image -> 'primary', observation/wrist_image -> 'wrist' (uint8 [H, W, 3], as
          LIBERO renders them rotated), observation/state float [8], prompt str. Actions come back
          in LIBERO's units: the gripper column, standardized as 1 = open / 0 = closed by the
          registry's libero entries, becomes -1 open / +1 close (openpi's LIBERO client steps the
          environment with the chunk as it arrives).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import msgpack
import numpy as np

from m2vla_jax.data.oxe import spec as oxe_spec
from m2vla_jax.serving import protocol


@dataclasses.dataclass(frozen=True)
class Layout:
  """An openpi client's observation keys and action convention.

  Attributes:
    cameras: openpi key -> our camera slot ('primary', 'secondary', 'wrist').
    state: openpi keys concatenated, in order, into the raw state.
    prompt: the key of the instruction string.
    signed_gripper_column: action column converted from the registry's absolute gripper (1 open,
      0 closed) to a signed command (-1 open, +1 close); None keeps the actions as they are.
  """
  cameras: Mapping[str, str]
  state: tuple[str, ...]
  prompt: str = "prompt"
  signed_gripper_column: Optional[int] = None


LAYOUTS = {
    "libero": Layout(cameras={"observation/image": "primary", "observation/wrist_image": "wrist"},
                     state=("observation/state",), signed_gripper_column=6),
}


def layout(name: str) -> Layout:
  if name not in LAYOUTS:
    raise ValueError(f"openpi layout {name!r} is unknown; use one of {sorted(LAYOUTS)}")
  return LAYOUTS[name]


# ------------------------------------------------------------------ encoding
def _pack_default(obj: Any) -> Any:
  if isinstance(obj, np.ndarray):
    arr = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("="))
    if arr.dtype.str not in protocol.DTYPES:
      raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent; use one of {sorted(protocol.DTYPES)}")
    return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  raise TypeError(f"cannot encode {type(obj).__name__}")


def packb(message: Any) -> bytes:
  """A message -> msgpack bytes in openpi's encoding."""
  return msgpack.packb(message, default=_pack_default, use_bin_type=True)


def _decode(obj: Any, field: str) -> Any:
  if isinstance(obj, dict):
    if obj.get(b"__ndarray__") is True:
      # Same checks as ours: the bytes-keyed map re-keyed with str for `protocol`'s array decoder.
      return protocol.decode_array({"dtype": obj.get(b"dtype"), "shape": list(obj.get(b"shape") or []),
                                    "data": obj.get(b"data")}, field)
    if obj.get(b"__npgeneric__") is True:
      dtype = obj.get(b"dtype")
      if not isinstance(dtype, str) or dtype not in protocol.DTYPES:
        raise protocol.ProtocolError(field, f"{field}: scalar dtype {dtype!r} is not allowed")
      return np.dtype(dtype).type(obj.get(b"data"))
    return {(k.decode() if isinstance(k, bytes) else k): _decode(v, f"{field}.{k}" if field else str(k))
            for k, v in obj.items()}
  if isinstance(obj, list):
    return [_decode(v, f"{field}[{i}]") for i, v in enumerate(obj)]
  return obj


def unpackb(data: bytes) -> Any:
  """openpi msgpack bytes -> a message with numpy arrays; ProtocolError naming the field if not."""
  if not isinstance(data, (bytes, bytearray)):
    raise protocol.ProtocolError("", "openpi messages are binary msgpack frames, got a text frame")
  try:
    raw = msgpack.unpackb(data, raw=False, strict_map_key=False)
  except Exception as e:  # msgpack raises several unrelated types for corrupt input
    raise protocol.ProtocolError("", f"the message is not valid msgpack ({type(e).__name__}: {e})") from e
  return _decode(raw, "")


# ------------------------------------------------------------------ layouts
def to_observation(msg: Any, lay: Layout, cameras: Sequence[str]) -> dict[str, Any]:
  """An openpi observation -> our raw observation of one row (cameras in the server's slot order).

  A slot the layout does not fill, or whose key the message lacks, is a masked black image.
  Raises ProtocolError naming the openpi key.
  """
  if not isinstance(msg, dict):
    raise protocol.ProtocolError("", f"an openpi observation is a map, got {type(msg).__name__}")
  by_slot = {slot: key for key, slot in lay.cameras.items()}
  images, mask, shape = [], [], None
  for slot in cameras:
    key = by_slot.get(slot)
    if key is not None and key in msg:
      image = msg[key]
      if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise protocol.ProtocolError(key, f"{key}: needs uint8 [H, W, 3], got "
                                     f"{getattr(image, 'dtype', type(image).__name__)} {np.shape(image)}")
      if shape is not None and image.shape != shape:
        raise protocol.ProtocolError(key, f"{key}: {image.shape} differs from the other camera's {shape}; "
                                     "send the cameras at one size")
      shape = image.shape
    images.append(msg.get(key) if key is not None else None)
    mask.append(key is not None and key in msg)
  if shape is None:
    raise protocol.ProtocolError(next(iter(lay.cameras)), f"no camera image: send one of {sorted(lay.cameras)}")
  images = [im if ok else np.zeros(shape, np.uint8) for im, ok in zip(images, mask)]
  parts = []
  for key in lay.state:
    if key not in msg:
      raise protocol.ProtocolError(key, f"{key}: missing (the {sorted(LAYOUTS)} layout's state)")
    x = np.asarray(msg[key])
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.number):
      raise protocol.ProtocolError(key, f"{key}: needs a float vector, got {x.dtype} {x.shape}")
    parts.append(x.astype(np.float32))
  prompt = msg.get(lay.prompt)
  if not isinstance(prompt, str):
    raise protocol.ProtocolError(lay.prompt, f"{lay.prompt}: needs the instruction string, got "
                                 f"{type(prompt).__name__}")
  return {"images": np.stack(images)[None], "image_mask": np.array([mask]),
          "state": np.concatenate(parts)[None], "instruction": [prompt]}


def to_response(actions: np.ndarray, lay: Layout, infer_ms: float, server_ms: float) -> dict[str, Any]:
  """Our actions of one row, float [H, A] in the dataset's units -> openpi's response map."""
  out = np.array(actions, np.float32)
  if lay.signed_gripper_column is not None:
    c = lay.signed_gripper_column
    out[..., c] = oxe_spec.signed_gripper(out[..., c])
  return {"actions": out, "server_timing": {"infer_ms": float(infer_ms), "server_ms": float(server_ms)}}
