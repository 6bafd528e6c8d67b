"""The policy server: raw observations in over a websocket, actions in the dataset's units out.

Owns serving one `inference.InferencePolicy` to many clients: request validation, the inference
worker thread and its micro-batching, warm-up, the metadata handshake, the health endpoint and the
shared-token check. The observation -> action path is the inference package's: raw observations
are encoded by `inference.observation.ObservationEncoder` (as the Meta-World adapter does) and
actions come from `InferencePolicy.normalized_actions` + `InferencePolicy.unnormalize`, so a served
policy returns exactly what the in-process call returns for the same batch.

Why the pieces are shaped as they are:
  - Inference runs in one worker thread; the asyncio event loop only decodes, validates and sends,
    so a slow model call never stalls other connections' handshakes, errors or health checks.
  - Every batch size the worker can run (`buckets`) is compiled before the port opens (`warmup`),
    so the first request is as fast as the rest. Micro-batching (`max_batch` > 1) concatenates the
    rows of requests that arrive within `max_wait_ms` of the first and pads them to the next bucket.
  - The model's sampling rng is `InferencePolicy`'s default (PRNGKey(0)) for every batch: the same
    observation alone in a batch gives the same actions as the in-process call. Rows merged into a
    larger batch see the same rng at a different batch shape; a deterministic policy (the toy) gives
    the same actions up to float rounding, a sampling head may give other samples.
  - A malformed request is answered with an error naming the field; the connection stays open.

Wire format: `serving.protocol`, or openpi's (`serving.openpi`, `openpi_layout=`) so openpi's
clients (e.g. its LIBERO example) connect unchanged. Entry point: `python -m m2vla_jax.serve`.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import http
import json
import logging
import queue
import sys
import threading
import time
from typing import Any, Callable, Optional

import numpy as np
from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed

import m2vla_jax
from m2vla_jax.inference import observation as obs_lib
from m2vla_jax.inference.policy import InferencePolicy
from m2vla_jax.serving import openpi
from m2vla_jax.serving import protocol

log = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_SIDE = 2048
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
MODEL_KEYS = ("images", "image_mask", "state", "tokens", "token_mask")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
  """The batch sizes the worker runs (and warm-up compiles): powers of two below max_batch, and it."""
  if max_batch < 1:
    raise ValueError(f"max_batch={max_batch}: must be >= 1")
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return tuple(sizes + [max_batch])


@dataclasses.dataclass
class _Job:
  raw: dict
  rows: int
  future: concurrent.futures.Future


class PolicyServer:
  """One policy, served; the asyncio side is `handler` / `process_request`, the model side a thread.

  Args:
    policy: the restored policy (`InferencePolicy.from_workdir` / `from_bundle`).
    max_batch: most rows one model call runs; > 1 turns micro-batching on. Requests may carry up to
      max_batch rows.
    max_wait_ms: how long the worker waits after a request for others to batch with it.
    dataset: the statistics entry to normalize with (default: the run's only one).
    max_image_side: largest H or W accepted in a request's images.
    token: a shared secret clients must send in the `X-M2VLA-Token` header, or openpi's
      "Authorization: Api-Key <token>" (None: no check).
    openpi_layout: None speaks our protocol (`serving.protocol`); a name of `serving.openpi.LAYOUTS`
      speaks openpi's (its clients connect unchanged: one unbatched observation per message).
  """

  def __init__(self, policy: InferencePolicy, *, max_batch: int = 1, max_wait_ms: float = 0.0,
               dataset: Optional[str] = None, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
               token: Optional[str] = None, openpi_layout: Optional[str] = None):
    if max_wait_ms < 0:
      raise ValueError(f"max_wait_ms={max_wait_ms}: must be >= 0")
    self.policy = policy
    self.normalization = policy.normalization(dataset)
    self.encoder = obs_lib.ObservationEncoder.from_config(policy.config, self.normalization)
    self.max_batch, self.max_wait_s = int(max_batch), float(max_wait_ms) / 1000.0
    self.buckets = batch_buckets(self.max_batch)
    self.max_image_side = int(max_image_side)
    self.token = token or None
    self.openpi = openpi.layout(openpi_layout) if openpi_layout else None
    self.openpi_layout = openpi_layout
    self.warmup_s: Optional[float] = None
    self._queue: "queue.Queue[Optional[_Job]]" = queue.Queue()
    self._carry: Optional[_Job] = None
    self._thread: Optional[threading.Thread] = None
    self.served = 0          # requests answered with actions (worker thread writes, others read)

  # ------------------------------------------------------------------ metadata
  def metadata(self) -> dict:
    """What a client needs to build requests and read responses (sent on connect)."""
    config = self.policy.config
    return {
        "type": "metadata", "protocol": protocol.PROTOCOL, "version": m2vla_jax.__version__,
        "policy": str(config.policy), "horizon": int(config.model.horizon),
        "action_dim": self.normalization.action_dim,
        "actions": "float32 [B, horizon, action_dim] in the dataset's units (unnormalized)",
        "cameras": list(self.encoder.cameras), "image_size": list(self.encoder.image_size),
        "images": "uint8 [B, C, H, W, 3], camera i fills slot cameras[i]; any H, W up to "
                  f"{self.max_image_side} (resized to image_size)",
        "state_dim": self.encoder.state_dim,
        "instruction": {"type": "list of B strings", "tokenizer": str(config.data.tokenizer),
                        "max_tokens": self.encoder.max_tokens},
        "normalization": {"mode": str(self.policy.statistics.get("normalization", "bounds")),
                          "dataset": self.normalization.dataset,
                          "state": "raw in (the server normalizes)",
                          "actions": "unnormalized out"},
        "max_batch": self.max_batch, "buckets": list(self.buckets),
        "max_wait_ms": self.max_wait_s * 1000.0, "warmup_s": self.warmup_s,
        "wire": f"openpi ({self.openpi_layout})" if self.openpi else protocol.PROTOCOL,
    }

  # ------------------------------------------------------------------ validation
  def check_observation(self, obs: Any) -> int:
    """Raises ObservationError naming the field; returns the request's rows."""
    rows = self.encoder.check(obs)
    h, w = obs["images"].shape[2:4]
    if max(h, w) > self.max_image_side:
      raise obs_lib.ObservationError("images", f"observation['images'] is {h}x{w}; the server accepts "
                                     f"sides up to {self.max_image_side} (it resizes to "
                                     f"{self.encoder.image_size}); downscale on the client")
    if rows > self.max_batch:
      raise obs_lib.ObservationError("images", f"the request has {rows} rows; this server runs at most "
                                     f"max_batch={self.max_batch} (start it with --max_batch={rows})")
    return rows

  # ------------------------------------------------------------------ model side
  def example_observation(self, rows: int) -> dict:
    """A raw observation of `rows` rows that passes `check_observation` (warm-up, benchmarks)."""
    h, w = self.encoder.image_size
    return {"images": np.zeros((rows, len(self.encoder.cameras), h, w, 3), np.uint8),
            "image_mask": np.ones((rows, len(self.encoder.cameras)), bool),
            "state": np.zeros((rows, self.encoder.state_dim), np.float32),
            "instruction": ["warm up"] * rows}

  def warmup(self) -> float:
    """Compiles every bucket's batch size; returns (and records) the seconds it took."""
    t0 = time.perf_counter()
    for b in self.buckets:
      self.run_batch([self.example_observation(b)])
    self.warmup_s = time.perf_counter() - t0
    return self.warmup_s

  def run_batch(self, raws: list[dict]) -> tuple[list[np.ndarray], float, int]:
    """Encodes, concatenates, pads to a bucket and runs raw observations (already checked).

    Returns (actions float32 [B_i, H, A_d] per observation, model milliseconds, bucket size)."""
    encoded = [self.encoder(r) for r in raws]
    rows = [e["images"].shape[0] for e in encoded]
    n = sum(rows)
    bucket = next((b for b in self.buckets if b >= n), None)
    if bucket is None:
      raise ValueError(f"{n} rows exceed max_batch={self.max_batch}")
    batch = {}
    for k in MODEL_KEYS:
      x = np.concatenate([e[k] for e in encoded]) if len(encoded) > 1 else encoded[0][k]
      if bucket > n:   # zero rows (masked images, empty text): the padding is never returned
        x = np.concatenate([x, np.zeros((bucket - n, *x.shape[1:]), x.dtype)])
      batch[k] = x
    t0 = time.perf_counter()
    normalized = self.policy.normalized_actions(batch)       # blocks until the result is on host
    infer_ms = (time.perf_counter() - t0) * 1000.0
    actions = self.policy.unnormalize(normalized[:n], self.normalization.dataset)
    return list(np.split(actions, np.cumsum(rows)[:-1])), infer_ms, bucket

  def submit(self, raw: dict, rows: int) -> concurrent.futures.Future:
    """Queues a checked observation for the worker; the future gives (actions, infer_ms, bucket)."""
    job = _Job(raw, rows, concurrent.futures.Future())
    self._queue.put(job)
    return job.future

  def start(self) -> None:
    if self._thread is None:
      self._thread = threading.Thread(target=self._worker, name="policy-worker", daemon=True)
      self._thread.start()

  def stop(self) -> None:
    if self._thread is not None:
      self._queue.put(None)
      self._thread.join()
      self._thread = None

  def _next_job(self, timeout: Optional[float]) -> Optional[_Job]:
    if self._carry is not None:
      job, self._carry = self._carry, None
      return job
    return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()

  def _worker(self) -> None:
    while True:
      first = self._next_job(None)
      if first is None:
        return
      jobs, rows = [first], first.rows
      deadline = time.monotonic() + self.max_wait_s
      stop = False
      while rows < self.max_batch:
        try:
          job = self._next_job(deadline - time.monotonic())
        except queue.Empty:
          break
        if job is None:
          stop = True
          break
        if rows + job.rows > self.max_batch:
          self._carry = job           # first in the next batch
          break
        jobs.append(job)
        rows += job.rows
      self._execute(jobs)
      if stop:
        return

  def _execute(self, jobs: list[_Job]) -> None:
    # A future cancelled meanwhile (its client went away) is skipped, not computed.
    live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
    if not live:
      return
    try:
      actions, infer_ms, bucket = self.run_batch([j.raw for j in live])
    except obs_lib.ObservationError:
      # One request's content (e.g. a word a closed-vocabulary tokenizer lacks) failed encoding: run
      # each alone so only that request gets the error.
      if len(live) > 1:
        for j in live:
          self._execute_one(j)
        return
      raise_into(live[0].future)
      return
    except Exception:  # the model failed: every request of the batch is answered with the error
      log.exception("inference failed")
      for j in live:
        raise_into(j.future)
      return
    for j, a in zip(live, actions):
      j.future.set_result((a, infer_ms, bucket))
    self.served += len(live)

  def _execute_one(self, job: _Job) -> None:
    try:
      actions, infer_ms, bucket = self.run_batch([job.raw])
    except Exception:  # pylint: disable=broad-except
      raise_into(job.future)
      return
    job.future.set_result((actions[0], infer_ms, bucket))
    self.served += 1

  # ------------------------------------------------------------------ asyncio side
  def process_request(self, connection: Any, request: Any) -> Any:
    """HTTP before the websocket upgrade: the health endpoint, then the token check."""
    if request.path == protocol.HEALTH_PATH:
      body = json.dumps({"status": "ok", "protocol": protocol.PROTOCOL, "served": self.served,
                         "warmup_s": self.warmup_s})
      return connection.respond(http.HTTPStatus.OK, body + "\n")
    if self.token is not None:
      got = request.headers.get(protocol.TOKEN_HEADER, "")
      api_key = request.headers.get("Authorization", "")   # openpi clients: "Api-Key <token>"
      if api_key.startswith("Api-Key ") and not got:
        got = api_key[len("Api-Key "):]
      if not hmac.compare_digest(got.encode(), self.token.encode()):
        return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                  f"missing or wrong {protocol.TOKEN_HEADER} header; pass the server's "
                                  "token (client: token=...)\n")
    return None

  async def handler(self, ws: Any) -> None:
    """One connection: metadata first, then a reply to every message, in order."""
    try:
      if self.openpi is not None:
        await ws.send(openpi.packb(self.metadata()))
        async for message in ws:
          await ws.send(await self._reply_openpi(message))
        return
      await ws.send(protocol.packb(self.metadata()))
      async for message in ws:
        reply = await self._reply(message)
        await ws.send(protocol.packb(reply))
    except ConnectionClosed:
      return    # the client went away, possibly mid-request; nothing to answer

  async def _reply(self, message: Any) -> dict:
    t0 = time.perf_counter()
    msg_id = None
    try:
      msg = protocol.unpackb(message)
      if not isinstance(msg, dict):
        raise protocol.ProtocolError("", f"a message is a msgpack map, got {type(msg).__name__}")
      msg_id = msg.get("id")
      kind = msg.get("type", "infer")
      if kind == "metadata":
        return self.metadata()
      if kind == "health":
        return {"type": "health", "status": "ok", "served": self.served, "id": msg_id}
      if kind != "infer":
        raise protocol.ProtocolError("type", f"unknown message type {kind!r:.50}; use 'infer', "
                                     "'metadata' or 'health'")
      if "observation" not in msg:
        raise protocol.ProtocolError("observation", "an 'infer' message needs an 'observation' map")
      obs = msg["observation"]
      rows = self.check_observation(obs)
      actions, infer_ms, bucket = await asyncio.wrap_future(self.submit(obs, rows))
      return {"type": "actions", "actions": actions.astype(np.float32), "infer_ms": infer_ms,
              "server_ms": (time.perf_counter() - t0) * 1000.0, "batch_size": bucket, "id": msg_id}
    except (protocol.ProtocolError, obs_lib.ObservationError) as e:
      return {"type": "error", "field": e.field, "message": str(e), "id": _plain(msg_id)}
    except Exception as e:  # pylint: disable=broad-except  (no client input may end the server)
      log.exception("request failed")
      return {"type": "error", "field": "", "message": f"server error: {type(e).__name__}: {e}",
              "id": _plain(msg_id)}


  async def _reply_openpi(self, message: Any) -> bytes | str:
    """openpi's exchange: an observation map in, {"actions": [H, A], ...} out; an error is a text frame."""
    t0 = time.perf_counter()
    try:
      obs = openpi.to_observation(openpi.unpackb(message), self.openpi, self.encoder.cameras)
      rows = self.check_observation(obs)
      actions, infer_ms, _ = await asyncio.wrap_future(self.submit(obs, rows))
      return openpi.packb(openpi.to_response(actions[0], self.openpi, infer_ms,
                                             (time.perf_counter() - t0) * 1000.0))
    except (protocol.ProtocolError, obs_lib.ObservationError) as e:
      return f"field {e.field!r}: {e}"
    except Exception as e:  # pylint: disable=broad-except  (no client input may end the server)
      log.exception("request failed")
      return f"server error: {type(e).__name__}: {e}"


def raise_into(future: concurrent.futures.Future) -> None:
  """Sets the exception being handled on `future` (inside an except block)."""
  future.set_exception(sys.exc_info()[1])


def _plain(x: Any) -> Any:
  """A message id echoed back only if it re-encodes (a client may send anything)."""
  return x if isinstance(x, (str, int, float, bool, type(None))) else None


def is_loopback(host: str) -> bool:
  return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


async def serve(server: PolicyServer, host: str = "127.0.0.1", port: int = 8000, *,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                on_ready: Optional[Callable[[int], None]] = None,
                stop: Optional[asyncio.Event] = None) -> None:
  """Runs the websocket server until `stop` is set (warm-up and the worker must be done / started).

  A message over `max_message_bytes` closes that connection (code 1009, websockets' limit): the
  bytes are refused before they are read whole."""
  if server.token is None and not is_loopback(host):
    raise ValueError(f"--host={host} exposes the policy beyond this machine; pass --token=SECRET "
                     "(clients send it in the X-M2VLA-Token header)")
  stop = stop or asyncio.Event()
  async with ws_server.serve(server.handler, host, port, process_request=server.process_request,
                             max_size=max_message_bytes, compression=None) as ws:
    bound = ws.sockets[0].getsockname()[1]
    if on_ready is not None:
      on_ready(bound)
    await stop.wait()
