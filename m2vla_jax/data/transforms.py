"""Per-frame transforms: action chunking, image decode/resize/augmentation (text: text/tokenizers.py).

All are plain numpy/PIL functions of one frame, applied by the grain pipeline after the frame-level
shuffle and mixing (so shuffling moves indices and encoded bytes, never decoded pixels).

Chunking: the chunk at step t is actions[t : t + H]; steps past the episode end (episodes may end
without `is_last`) repeat the episode's last action and get mask False, so a loss that ignores the mask
still sees a plausible "hold" target.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image


try:  # OpenCV decodes (same libjpeg-turbo output as PIL) and resizes ~8x faster; PIL is the fallback.
  import cv2
except ImportError:  # pragma: no cover - depends on the environment
  cv2 = None


def chunk_actions(actions: np.ndarray, t: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
  """actions [T, A], start t -> (chunk [H, A], mask bool [H]); past the end repeats actions[T-1]."""
  n = actions.shape[0]
  idx = np.arange(t, t + horizon)
  mask = idx < n
  return actions[np.minimum(idx, n - 1)], mask


def _decode_pil(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB") if im.mode != "RGB" else im)


def decode_image(data: Any) -> np.ndarray:
  """Encoded JPEG/PNG bytes (or a uint8 array) -> uint8 [H, W, 3]."""
  if isinstance(data, np.ndarray):
    return data
  if cv2 is None:
    return _decode_pil(data)
  img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if img is None:
    raise ValueError(f"not a decodable image ({len(data)} bytes, starts {bytes(data[:8])!r})")
  return img[..., ::-1]  # BGR -> RGB


def decode_resize(data: Any, size: tuple[int, int], crop: tuple[float, float, float, float] | None = None
                  ) -> np.ndarray:
  """Decode, optionally crop (box in relative [x0, y0, x1, y1]) and resize to size=(H, W) (bilinear,
  half-pixel centers; OpenCV and PIL agree to +-1). No resize when the size already matches."""
  if cv2 is not None:
    img = decode_image(data)
    if crop is not None:
      hh, ww = img.shape[:2]
      x0, y0, x1, y1 = crop
      xa, ya = int(round(x0 * ww)), int(round(y0 * hh))
      img = img[ya:max(ya + 1, int(round(y1 * hh))), xa:max(xa + 1, int(round(x1 * ww)))]
    if img.shape[:2] == tuple(size):
      return np.ascontiguousarray(img)
    return cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
  if isinstance(data, np.ndarray):
    im = Image.fromarray(data)
  else:
    im = Image.open(io.BytesIO(data))
    if im.mode != "RGB":
      im = im.convert("RGB")
  h, w = size
  if crop is None and im.size == (w, h):
    return np.asarray(im)
  box = None
  if crop is not None:
    x0, y0, x1, y1 = crop
    box = (x0 * im.size[0], y0 * im.size[1], x1 * im.size[0], y1 * im.size[1])
  return np.asarray(im.resize((w, h), Image.BILINEAR, box=box))


def random_crop_box(rng: np.random.Generator, scale: Sequence[float], ratio: Sequence[float]
                    ) -> tuple[float, float, float, float]:
  """A random-resized-crop box in relative coordinates: area fraction in `scale`, aspect in `ratio`."""
  area = rng.uniform(*scale)
  log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]))
  r = np.exp(log_r)
  cw, ch = min(1.0, np.sqrt(area * r)), min(1.0, np.sqrt(area / r))
  x0, y0 = rng.uniform(0, 1 - cw), rng.uniform(0, 1 - ch)
  return (x0, y0, x0 + cw, y0 + ch)


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float) -> np.ndarray:
  """uint8 [H, W, 3] -> uint8: brightness/contrast/saturation factors uniform in [1 - s, 1 + s]."""
  x = img.astype(np.float32)
  if brightness:
    x *= rng.uniform(1 - brightness, 1 + brightness)
  if contrast:
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
  if saturation:
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray[..., None]) * rng.uniform(1 - saturation, 1 + saturation) + gray[..., None]
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)
