"""The robot / simulator side of the policy server: numpy + websockets + msgpack, nothing else.

Owns talking to `serving.server` from an environment that must not carry JAX or TensorFlow (a robot
computer, a simulator's own venv): it imports only numpy, websockets, msgpack and `serving.protocol`
(tests/serving/test_server.py checks in a fresh interpreter that no jax module gets loaded).

  client = PolicyClient("ws://127.0.0.1:8000", token=None)   # connects, reads the metadata
  actions = client.actions(obs)          # obs: images uint8 [B,C,H,W,3], image_mask bool [B,C],
                                         # state float [B,S], instruction list[str] -> f32 [B,H,A]
  chunker = ActionChunker(client.actions, horizon=client.metadata["horizon"], execute=4)
  action = chunker.step(obs)             # one action per control step, f32 [B, A]

`PolicyClient` retries a request that timed out or lost its connection (reconnecting, with
backoff); an answer the server refused (`ServerError`, naming the field) is not retried.
`ActionChunker` turns chunks into per-step actions: receding horizon (execute n of H), CogACT's
adaptive temporal ensembling, or asynchronous prefetch of the next chunk while the current one runs.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import time
from typing import Any, Callable, Mapping, Optional

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync import client as ws_client

from m2vla_jax.serving import protocol


class ServerError(RuntimeError):
  """The server answered with an error; `field` names the offending request key ('' if none)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}" if field else message)
    self.field = field


class _OutOfStep(ConnectionError):
  """An answer to another request than the one sent: the connection is out of step (retried)."""


class PolicyClient:
  """A connection to a policy server (see the module docstring).

  Args:
    uri: 'ws://host:port'.
    token: the server's shared token (sent as the X-M2VLA-Token header), if it has one.
    timeout_s: longest wait for one answer before the request is retried on a new connection.
    retries: further attempts after a timeout or a lost connection (0: none).
    backoff_s: wait before the first retry; doubles each time.
    connect_timeout_s: longest wait for the connection and the metadata.
  """

  def __init__(self, uri: str, *, token: Optional[str] = None, timeout_s: float = 30.0,
               retries: int = 3, backoff_s: float = 0.2, connect_timeout_s: float = 10.0,
               max_message_bytes: int = 64 * 1024 * 1024):
    self.uri, self.token = uri, token
    self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
    self.connect_timeout_s, self.max_message_bytes = float(connect_timeout_s), int(max_message_bytes)
    self._ws = None
    self._ids = itertools.count()
    self.metadata: dict = {}
    self._with_retries(self._connect)

  # ------------------------------------------------------------------ connection
  def _connect(self) -> None:
    headers = {protocol.TOKEN_HEADER: self.token} if self.token else None
    try:
      ws = ws_client.connect(self.uri, additional_headers=headers, open_timeout=self.connect_timeout_s,
                             max_size=self.max_message_bytes, compression=None)
    except InvalidStatus as e:
      status = e.response.status_code
      hint = " (wrong or missing token)" if status == 401 else ""
      raise ServerError("token" if status == 401 else "", f"the server refused the connection: HTTP "
                        f"{status}{hint}") from e
    try:
      metadata = protocol.unpackb(ws.recv(timeout=self.connect_timeout_s))
    except BaseException:
      ws.close()
      raise
    if not isinstance(metadata, dict) or metadata.get("protocol") != protocol.PROTOCOL:
      ws.close()
      raise ServerError("protocol", f"{self.uri} does not speak {protocol.PROTOCOL} (first message: "
                        f"{str(metadata)[:200]})")
    self._ws, self.metadata = ws, metadata

  def close(self) -> None:
    if self._ws is not None:
      self._ws.close()
      self._ws = None

  def __enter__(self) -> "PolicyClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _with_retries(self, fn: Callable[[], Any]) -> Any:
    delay = self.backoff_s
    for attempt in range(self.retries + 1):
      try:
        if fn is not self._connect and self._ws is None:
          self._connect()
        return fn()
      except (ConnectionClosed, TimeoutError, OSError) as e:
        self.close()    # a late answer must not be read as the next request's
        if attempt == self.retries:
          raise ConnectionError(f"{self.uri}: no answer after {self.retries + 1} attempt(s) "
                                f"({type(e).__name__}: {e})") from e
        time.sleep(delay)
        delay *= 2

  # ------------------------------------------------------------------ requests
  def request(self, message: Mapping[str, Any]) -> dict:
    """Sends one message and returns the server's answer; ServerError if it is an error."""
    def once():
      msg_id = next(self._ids)
      self._ws.send(protocol.packb({**message, "id": msg_id}))
      reply = protocol.unpackb(self._ws.recv(timeout=self.timeout_s))
      if reply.get("type") == "error":
        raise ServerError(reply.get("field", ""), reply.get("message", ""))
      if reply.get("id") != msg_id:
        raise _OutOfStep(f"answer {reply.get('id')!r} to request {msg_id}")   # reconnect, retry
      return reply
    return self._with_retries(once)

  def infer(self, observation: Mapping[str, Any]) -> dict:
    """{'actions': float32 [B, H, A_d], 'infer_ms', 'server_ms', 'batch_size'} for a raw observation."""
    return self.request({"type": "infer", "observation": dict(observation)})

  def actions(self, observation: Mapping[str, Any]) -> np.ndarray:
    return self.infer(observation)["actions"]

  def health(self) -> dict:
    return self.request({"type": "health"})


class RemotePolicy:
  """A policy server as a simulator's chunked policy (`evaluation.closed_loop`): `policy(obs)` sends
  the raw observation's contract keys (a simulator's extra keys, e.g. privileged state, stay here)
  and returns float32 [B, H, A_d] in the dataset's units."""
  KEYS = ("images", "image_mask", "state", "instruction")

  def __init__(self, uri: str, token: Optional[str] = None, **client_kwargs: Any):
    self.client = PolicyClient(uri, token=token, **client_kwargs)

  def __call__(self, observation: Mapping[str, Any]) -> np.ndarray:
    return self.client.actions({k: observation[k] for k in self.KEYS})

  def close(self) -> None:
    self.client.close()


class ActionChunker:
  """Per-step actions from a chunk predictor `infer(obs) -> [B, H, A]`.

  Modes:
    receding horizon (default): ask for a chunk, execute its first `execute` steps, ask again.
    ensemble_alpha=a: ask every step; the action for now averages the predictions for now of the
      last H chunks, weighted by exp(a * cosine(prediction, newest prediction)) (CogACT's adaptive
      ensembler; a = 0 is a plain mean).
    prefetch=k (receding horizon): `k` steps before the queue empties, ask for the next chunk in a
      background thread with that step's observation; its first k actions are for the steps
      executed meanwhile and are skipped, so the robot never waits for the server (if inference
      takes under k steps). Needs k <= execute and k + execute <= H.
  """

  def __init__(self, infer: Callable[[Any], np.ndarray], horizon: int, execute: Optional[int] = None,
               ensemble_alpha: Optional[float] = None, prefetch: int = 0):
    self.infer, self.horizon = infer, int(horizon)
    self.execute = self.horizon if execute is None else int(execute)
    if not 1 <= self.execute <= self.horizon:
      raise ValueError(f"execute={execute}: must be in [1, horizon={self.horizon}]")
    if prefetch and ensemble_alpha is not None:
      raise ValueError("prefetch and ensemble_alpha: ensembling asks every step, there is nothing to "
                       "prefetch; pick one")
    if prefetch and not (1 <= prefetch <= self.execute and prefetch + self.execute <= self.horizon):
      raise ValueError(f"prefetch={prefetch}: needs 1 <= prefetch <= execute={self.execute} and "
                       f"prefetch + execute <= horizon={self.horizon}")
    self.ensemble_alpha, self.prefetch = ensemble_alpha, int(prefetch)
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if self.prefetch else None
    self.reset()

  def reset(self) -> None:
    """Call at each episode start: drops queued actions, ensemble history and a pending prefetch."""
    self._queue: collections.deque = collections.deque()
    self._history: collections.deque = collections.deque(maxlen=self.horizon)
    pending = getattr(self, "_pending", None)
    if pending is not None:
      pending.cancel()
    self._pending: Optional[concurrent.futures.Future] = None
    self.requests = 0

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True)

  def _ask(self, obs: Any) -> np.ndarray:
    self.requests += 1
    chunk = np.asarray(self.infer(obs))
    if chunk.ndim != 3 or chunk.shape[1] != self.horizon:
      raise ValueError(f"the policy returned shape {chunk.shape}; expected [B, horizon={self.horizon}, A]")
    return chunk

  def step(self, obs: Any) -> np.ndarray:
    """The action for this control step, [B, A]."""
    if self.ensemble_alpha is not None:
      return self._ensembled(obs)
    if not self._queue:
      if self._pending is not None:
        chunk, skip = self._pending.result(), self.prefetch
        self._pending = None
      else:
        chunk, skip = self._ask(obs), 0
      self._queue.extend(chunk[:, skip + i] for i in range(self.execute))
    if self.prefetch and self._pending is None and len(self._queue) == self.prefetch:
      self._pending = self._pool.submit(self._ask, obs)
    return self._queue.popleft()

  def _ensembled(self, obs: Any) -> np.ndarray:
    self._history.append(self._ask(obs))
    # The chunk asked `age` steps ago predicts now at its index `age`; newest last.
    n = len(self._history)
    preds = np.stack([c[:, n - 1 - i] for i, c in enumerate(self._history)], axis=1)   # [B, n, A]
    ref = preds[:, -1:]
    eps = 1e-8
    cos = (preds * ref).sum(-1) / (np.linalg.norm(preds, axis=-1) * np.linalg.norm(ref, axis=-1) + eps)
    w = np.exp(self.ensemble_alpha * cos)
    w /= w.sum(axis=1, keepdims=True)
    return (w[..., None] * preds).sum(axis=1).astype(preds.dtype)
