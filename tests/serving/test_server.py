"""The policy server as a real process on loopback, with real websocket clients.

A toy run (the debug config's synthetic data, plus the tokenizer and pipeline settings an RLDS run
would record, so raw observations can be encoded) is exported once; two `python -m m2vla_jax.serve`
processes serve its bundle: one micro-batching (max_batch=4), one token-protected. The in-process
reference is `InferencePolicy.from_bundle` + `ObservationEncoder`, the path the server wraps.
"""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import ml_collections
import numpy as np
import pytest
from websockets.sync import client as ws_client

from m2vla_jax import inference
from m2vla_jax.inference import observation as obs_lib
from m2vla_jax.serving import client as client_lib
from m2vla_jax.serving import protocol
from m2vla_jax.training import trainer
import support

TOKEN = "s3cret-token"
MAX_IMAGE_SIDE = 256


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  c = support.debug_config("steps=2,batch=8", **{"checkpoint.every": 2})
  with c.unlocked():   # what an RLDS run records; the toy's own shapes (16 px, 8 tokens, vocab 64)
    c.data.tokenizer = "bytes_mod:64"
    c.data.pipeline = ml_collections.ConfigDict(dict(
        cameras=("primary", "wrist"), image_size=(16, 16), max_tokens=8, data_dir=str(workdir)))
  trainer.train(c, str(workdir))
  return inference.export(str(workdir), str(tmp_path_factory.mktemp("bundle")))


def _server(bundle_dir, *args):
  return support.ServeProcess(f"--bundle={bundle_dir}", f"--max_image_side={MAX_IMAGE_SIDE}", *args)


@pytest.fixture(scope="module")
def servers(bundle):
  # Both start now and warm up in parallel; each test waits only for the one it uses.
  s = {"batching": _server(bundle, "--max_batch=4", "--max_wait_ms=50"),
       "token": _server(bundle, f"--token={TOKEN}"),
       "openpi": _server(bundle, "--openpi_layout=libero", f"--token={TOKEN}")}
  yield s
  for server in s.values():
    server.stop()
  for server in s.values():
    assert server.proc.returncode == 0, "".join(server.output)   # SIGTERM: a clean shutdown


@pytest.fixture(scope="module")
def reference(bundle):
  """The in-process path for raw observations: encoder -> InferencePolicy."""
  policy = inference.InferencePolicy.from_bundle(bundle)
  encoder = obs_lib.ObservationEncoder.from_config(policy.config, policy.normalization())
  return lambda obs: policy(encoder(obs)).astype(np.float32)


def _obs(b=1, seed=0, size=24):
  rng = np.random.default_rng(seed)
  return {"images": rng.integers(0, 256, (b, 2, size, size, 3), dtype=np.uint8),
          "image_mask": np.array([[True, seed % 2 == 0]] * b),
          "state": rng.normal(size=(b, 7)).astype(np.float32),
          "instruction": [f"pick block {seed} {i}" for i in range(b)]}


def test_client_imports_no_model_code():
  code = ("import sys; import m2vla_jax.serving.client; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', "
          "'tensorflow', 'optax', 'orbax') or m.startswith(('m2vla_jax.inference', 'm2vla_jax.models'))); "
          "print(bad); sys.exit(1 if bad else 0)")
  out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(support.REPO)),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


def test_protocol_arrays_round_trip_and_refuse_what_is_not_an_array():
  msg = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.array([True, False])], "s": "x"}
  back = protocol.unpackb(protocol.packb(msg))
  assert back["a"].dtype == np.float32 and np.array_equal(back["a"], msg["a"])
  assert np.array_equal(back["b"][0], msg["b"][0]) and back["s"] == "x"
  big_endian = protocol.unpackb(protocol.packb({"x": np.arange(3, dtype=">i4")}))["x"]
  assert big_endian.dtype == np.int32 and big_endian.tolist() == [0, 1, 2]
  bad = protocol.packb({"obs": {"state": {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"x"}}})
  with pytest.raises(protocol.ProtocolError, match="not allowed") as e:
    protocol.unpackb(bad)
  assert e.value.field == "obs.state"
  short = protocol.packb({"s": {"__ndarray__": True, "dtype": "<f4", "shape": [1000], "data": b"\0" * 8}})
  with pytest.raises(protocol.ProtocolError, match="needs 4000 bytes"):
    protocol.unpackb(short)
  with pytest.raises(protocol.ProtocolError, match="not valid msgpack"):
    protocol.unpackb(b"\xc1\xc1")
  with pytest.raises(TypeError, match="cannot be sent"):
    protocol.packb({"x": np.array([object()])})


def test_actions_equal_the_in_process_call(servers, reference):
  with client_lib.PolicyClient(servers["batching"].uri) as client:
    md = client.metadata
    assert md["protocol"] == protocol.PROTOCOL and md["policy"] == "toy" and md["horizon"] == 4
    assert md["cameras"] == ["primary", "wrist"] and md["image_size"] == [16, 16]
    assert md["state_dim"] == 7 and md["action_dim"] == 7 and md["buckets"] == [1, 2, 4]
    assert md["instruction"]["tokenizer"] == "bytes_mod:64" and md["warmup_s"] > 0
    for seed in range(3):
      obs = _obs(seed=seed)
      reply = client.infer(obs)
      assert reply["actions"].dtype == np.float32 and reply["actions"].shape == (1, 4, 7)
      assert reply["batch_size"] == 1 and 0 < reply["infer_ms"] <= reply["server_ms"]
      # Same program (batch 1), same inputs, one CPU: the same bits.
      np.testing.assert_array_equal(reply["actions"], reference(obs))
    # A request of 3 rows runs padded to the bucket of 4: equal up to float rounding.
    obs = _obs(b=3, seed=7)
    np.testing.assert_allclose(client.actions(obs), reference(obs), rtol=1e-5, atol=1e-5)


def test_eight_concurrent_clients_are_micro_batched(servers, reference):
  uri = servers["batching"].uri
  barrier, results, errors = threading.Barrier(8), {}, []

  def run(k):
    try:
      with client_lib.PolicyClient(uri) as client:
        for r in range(3):
          barrier.wait(timeout=30)
          results[(k, r)] = client.infer(_obs(seed=10 * k + r))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))

  threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert not errors and len(results) == 24, errors
  for (k, r), reply in results.items():
    # Rows merged into a batch of 2 or 4 compile to another program: float rounding may differ.
    np.testing.assert_allclose(reply["actions"], reference(_obs(seed=10 * k + r)), rtol=1e-5, atol=1e-5)
  assert max(reply["batch_size"] for reply in results.values()) > 1   # requests were batched


def test_a_client_disconnecting_mid_request_does_not_disturb_the_server(servers, reference):
  uri = servers["batching"].uri
  for _ in range(3):
    ws = ws_client.connect(uri, compression=None)
    ws.recv(timeout=10)       # metadata
    ws.send(protocol.packb({"type": "infer", "observation": _obs(seed=1)}))
    ws.close()                # gone before the answer
  raw = ws_client.connect(uri, compression=None)
  raw.recv(timeout=10)
  raw.send(protocol.packb({"type": "infer", "observation": _obs(seed=2)}))
  raw.socket.close()          # no closing handshake at all
  with client_lib.PolicyClient(uri) as client:
    np.testing.assert_array_equal(client.actions(_obs(seed=3)), reference(_obs(seed=3)))
    assert client.health()["status"] == "ok"


def _malformed():
  ok = _obs(seed=4)

  def edit(**kw):
    return {"type": "infer", "observation": {**ok, **kw}}

  missing = {k: v for k, v in ok.items() if k != "state"}
  nan_state = ok["state"].copy()
  nan_state[0, 2] = np.nan
  return {
      "missing key": ({"type": "infer", "observation": missing}, "state"),
      "no observation": ({"type": "infer"}, "observation"),
      "wrong state shape": (edit(state=np.zeros((1, 5), np.float32)), "state"),
      "wrong image dtype": (edit(images=ok["images"].astype(np.float32)), "images"),
      "wrong image rank": (edit(images=ok["images"][:, 0]), "images"),
      "image_mask not bool": (edit(image_mask=np.ones((1, 2), np.int32)), "image_mask"),
      "NaN state": (edit(state=nan_state), "state"),
      "oversized image": (edit(images=np.zeros((1, 2, MAX_IMAGE_SIDE + 1, 8, 3), np.uint8)), "images"),
      "instruction not a list": (edit(instruction="pick block"), "instruction"),
      "instruction not strings": (edit(instruction=[7]), "instruction"),
      "too many rows": ({"type": "infer", "observation": _obs(b=5)}, "images"),
      "unknown type": ({"type": "reboot"}, "type"),
      "not a map": ([1, 2, 3], ""),
  }


def test_each_malformed_request_gets_a_named_error_and_the_connection_stays_usable(servers, reference):
  uri = servers["batching"].uri
  good = _obs(seed=5)
  with ws_client.connect(uri, compression=None) as ws:
    assert protocol.unpackb(ws.recv(timeout=10))["type"] == "metadata"
    cases = [(name, protocol.packb(m), f) for name, (m, f) in _malformed().items()]
    cases += [("not msgpack", b"\xc1\xc1\xc1", ""),
              ("bad array bytes", protocol.packb({"type": "infer", "observation": {
                  **good, "state": {"__ndarray__": True, "dtype": "<f4", "shape": [1, 7],
                                    "data": b"\0" * 3}}}), "observation.state"),
              ("object dtype", protocol.packb({"type": "infer", "observation": {
                  **good, "state": {"__ndarray__": True, "dtype": "|O", "shape": [1, 7],
                                    "data": b"\0" * 56}}}), "observation.state")]
    for name, payload, field in cases:
      ws.send(payload)
      reply = protocol.unpackb(ws.recv(timeout=30))
      assert reply["type"] == "error" and reply["field"] == field, (name, reply)
      assert reply["message"], name
      ws.send(protocol.packb({"type": "infer", "observation": good}))   # still serving, same socket
      reply = protocol.unpackb(ws.recv(timeout=30))
      assert reply["type"] == "actions", (name, reply)
      np.testing.assert_array_equal(reply["actions"], reference(good))
  # The client raises them as ServerError naming the field.
  with client_lib.PolicyClient(uri) as client:
    with pytest.raises(client_lib.ServerError, match="NaN") as e:
      client.infer(_malformed()["NaN state"][0]["observation"])
    assert e.value.field == "state"


def test_token_protected_server_refuses_clients_without_it(servers, reference):
  uri = servers["token"].uri
  for token in (None, "wrong"):
    with pytest.raises(client_lib.ServerError, match="401") as e:
      client_lib.PolicyClient(uri, token=token, retries=0)
    assert e.value.field == "token"
  with client_lib.PolicyClient(uri, token=TOKEN) as client:
    assert client.metadata["buckets"] == [1]
    np.testing.assert_array_equal(client.actions(_obs(seed=6)), reference(_obs(seed=6)))
  # The HTTP health endpoint answers without a websocket (and without the token).
  port = uri.rsplit(":", 1)[1]
  with urllib.request.urlopen(f"http://127.0.0.1:{port}{protocol.HEALTH_PATH}", timeout=10) as r:
    health = json.loads(r.read())
  assert r.status == 200 and health["status"] == "ok" and health["served"] >= 1


def test_client_retries_then_reports_an_unreachable_server():
  t0 = time.time()
  with pytest.raises(ConnectionError, match="3 attempt"):
    client_lib.PolicyClient("ws://127.0.0.1:9", retries=2, backoff_s=0.05, connect_timeout_s=2)
  assert time.time() - t0 < 10


def test_serve_refuses_a_public_host_without_a_token(tmp_path):
  out = subprocess.run([sys.executable, "-m", "m2vla_jax.serve", f"--bundle={tmp_path}", "--host=0.0.0.0"],
                       env=dict(os.environ, PYTHONPATH=str(support.REPO), JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=60)
  assert out.returncode != 0 and "--token" in out.stderr + out.stdout


# ------------------------------------------------------------------ the action-chunk queue
def _counting_policy(horizon=4, dim=2):
  """infer(obs) -> chunk whose step i holds [t0 + i, call]: t0 is obs['t'], call counts requests."""
  calls = []

  def infer(obs):
    calls.append(obs["t"])
    t = obs["t"] + np.arange(horizon, dtype=np.float32)
    return np.stack([t, np.full(horizon, len(calls), np.float32)], -1)[None, :, :dim]
  return infer, calls


def test_chunker_receding_horizon_executes_n_of_h():
  infer, calls = _counting_policy()
  chunker = client_lib.ActionChunker(infer, horizon=4, execute=3)
  out = [chunker.step({"t": t}) for t in range(7)]
  assert calls == [0, 3, 6]
  assert [float(a[0, 0]) for a in out] == list(range(7))   # each action is for its own step


def test_chunker_prefetch_asks_early_and_skips_the_steps_executed_meanwhile():
  infer, calls = _counting_policy()
  chunker = client_lib.ActionChunker(infer, horizon=4, execute=2, prefetch=1)
  out = [chunker.step({"t": t}) for t in range(7)]
  chunker.close()
  assert [float(a[0, 0]) for a in out] == list(range(7))   # aligned despite the early request
  assert calls[:4] == [0, 1, 3, 5]
  with pytest.raises(ValueError, match="prefetch"):
    client_lib.ActionChunker(infer, horizon=4, execute=3, prefetch=2)


def test_chunker_adaptive_ensemble_matches_cogact_weights():
  chunks = [np.array([[[1.0, 0.0]] * 3]), np.array([[[0.0, 1.0]] * 3]), np.array([[[1.0, 1.0]] * 3])]
  it = iter(chunks)
  chunker = client_lib.ActionChunker(lambda obs: next(it), horizon=3, ensemble_alpha=0.5)
  a0 = chunker.step(None)
  np.testing.assert_allclose(a0, [[1.0, 0.0]])
  chunker.step(None)
  a2 = chunker.step(None)
  preds = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])     # oldest first, each's prediction for now
  cos = preds @ preds[-1] / (np.linalg.norm(preds, axis=1) * np.linalg.norm(preds[-1]))
  w = np.exp(0.5 * cos) / np.exp(0.5 * cos).sum()
  np.testing.assert_allclose(a2[0], w @ preds, rtol=1e-6)


# ------------------------------------------------------------------ openpi's protocol
# openpi_client 0.1.2's msgpack_numpy, written here from its published source (the package pins
# numpy < 2, so it does not install beside ours): arrays as maps with bytes keys.
def _openpi_pack(obj):
  if isinstance(obj, np.ndarray):
    return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
  if isinstance(obj, np.generic):
    return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
  return obj


def _openpi_unpack(obj):
  if b"__ndarray__" in obj:
    return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
  if b"__npgeneric__" in obj:
    return np.dtype(obj[b"dtype"]).type(obj[b"data"])
  return obj


def _openpi_connect(uri, token):
  import msgpack  # pylint: disable=g-import-not-at-top
  ws = ws_client.connect(uri, compression=None, max_size=None,
                         additional_headers={"Authorization": f"Api-Key {token}"})
  metadata = msgpack.unpackb(ws.recv(), object_hook=_openpi_unpack)
  send = lambda obs: ws.send(msgpack.packb(obs, default=_openpi_pack))  # noqa: E731
  recv = lambda: (lambda r: r if isinstance(r, str) else msgpack.unpackb(r, object_hook=_openpi_unpack))(ws.recv())  # noqa: E731
  return ws, metadata, send, recv


def test_openpi_client_gets_libero_actions_equal_to_the_in_process_call(servers, reference):
  obs = _obs(b=1, seed=3)
  openpi_obs = {"observation/image": obs["images"][0, 0], "observation/wrist_image": obs["images"][0, 1],
                "observation/state": obs["state"][0], "prompt": obs["instruction"][0]}
  ws, metadata, send, recv = _openpi_connect(servers["openpi"].uri, TOKEN)
  with ws:
    assert metadata["wire"] == "openpi (libero)" and metadata["horizon"] > 0
    send(openpi_obs)
    reply = recv()
    # The same observation in-process (both cameras present), the gripper column made LIBERO's
    # signed command: 1 - 2 * (1 = open, 0 = closed).
    want = reference({**obs, "image_mask": np.ones((1, 2), bool)})[0]
    want[..., 6] = 1.0 - 2.0 * want[..., 6]
    assert reply["actions"].dtype == np.float32
    np.testing.assert_array_equal(reply["actions"], want)
    assert reply["server_timing"]["infer_ms"] > 0
    # Errors are text frames naming the key; the connection keeps serving.
    send({k: v for k, v in openpi_obs.items() if k != "prompt"})
    error = recv()
    assert isinstance(error, str) and "prompt" in error
    send({**openpi_obs, "observation/state": openpi_obs["observation/state"].astype(np.complex64)})
    assert isinstance(recv(), str)
    send(openpi_obs)
    np.testing.assert_array_equal(recv()["actions"], want)
  with pytest.raises(Exception, match="401"):
    _openpi_connect(servers["openpi"].uri, "wrong")

