"""A GCS JSON-API server on loopback for tests: `gcp-storage-emulator`, with the deviations from real GCS
that tensorstore and gcsfs trip over fixed.

Run as a program (`python tests/gcs_emulator.py --bucket=NAME`) it serves an in-memory store on a free
loopback port and prints `PORT <n>` once it accepts connections; `Emulator(bucket)` does that in a
subprocess and holds the port and the environment (`client_env`) that points tensorstore (orbax's array
store) and gcsfs (etils.epath's gs:// backend) at it. The clients speak plain HTTP to it, exactly as they would to storage.googleapis.com.

What the stock emulator (gcp-storage-emulator 2026.7.19) does differently from GCS, and why it matters:
  1. Preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`, `ifMetagenerationMatch`,
     `ifMetagenerationNotMatch`) are ignored. GCS answers 412 Precondition Failed, or 304 Not Modified for
     a read whose `ifGenerationNotMatch` fails. OCDBT (orbax's array store) commits by re-reading
     `manifest.ocdbt` with `ifGenerationNotMatch=<cached generation>` and rewriting it with
     `ifGenerationMatch=<generation>`.
  2. Media downloads (`alt=media`) carry no `x-goog-generation` / `x-goog-metageneration` headers; GCS
     always sends them and tensorstore takes the object's generation from them.
  Together: the manifest re-read that GCS answers 304 comes back 200 without a generation, tensorstore
  records generation 0, and the next manifest write, conditioned on it, is refused client-side as
  "Malformed StorageGeneration" (tensorstore accepts only unconditional, "no value" or a generation > 0).
  Seen in the tensorstore HTTP log (TENSORSTORE_VERBOSE_LOGGING=gcs_http=1) of an orbax save; whether a
  save hits it depends on request timing, so `test_emulator_serves_generations_and_preconditions` checks
  the fixture's behaviour directly.
  3. The server is single-threaded HTTP/1.0 with a listen backlog of 5. curl (tensorstore) sends
     `Expect: 100-continue` with large bodies and waits 1 s for a 100 that an HTTP/1.0 server never sends:
     measured 5.1 s for five 4 MiB tensorstore writes, 0.3 s here. Here: a threaded HTTP/1.1 server
     (100-continue, keep-alive) with a 128-connection backlog; requests are still applied one at a time
     under a lock, because the emulator's storage is not thread-safe.
  4. A zero-length media upload (`uploadType=media`, empty body) crashes the handler (it reads the body
     as None); GCS stores an empty object. TensorFlow's gs:// `makedirs` writes exactly that: an empty
     `dir/` marker object (tests/data/test_gcs.py, through tests/gcs_tls_proxy.py).
"""
from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from http import server as http_server

_LOCK = threading.Lock()


def _query_int(request, name):
  values = request.query.get(name)
  return int(values[0]) if values else None


def _current(storage, bucket, name):
  """(generation, metageneration) of the live object, or (0, 0) if it does not exist (GCS's convention)."""
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=g-import-not-at-top
  try:
    obj = storage.get_file_obj(bucket, name)
  except NotFound:
    return 0, 0
  return int(obj["generation"]), int(obj["metageneration"])


def _precondition_status(request, storage, bucket, name, is_read):
  """The status GCS answers instead of serving the request, or None if every precondition holds."""
  gen, meta = _current(storage, bucket, name)
  match, not_match = _query_int(request, "ifGenerationMatch"), _query_int(request, "ifGenerationNotMatch")
  meta_match = _query_int(request, "ifMetagenerationMatch")
  meta_not_match = _query_int(request, "ifMetagenerationNotMatch")
  if match is not None and match != gen:
    return HTTPStatus.PRECONDITION_FAILED
  if meta_match is not None and meta_match != meta:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match is not None and not_match == gen:
    return HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
  if meta_not_match is not None and meta_not_match == meta:
    return HTTPStatus.NOT_MODIFIED if is_read else HTTPStatus.PRECONDITION_FAILED
  return None


def _with_preconditions(handler, is_read):
  def wrapped(request, response, storage, *args, **kwargs):
    params = request.params or {}
    bucket = params.get("bucket_name")
    name = params.get("object_id")
    if name is None and request.query.get("name"):  # uploads name the object in the query
      name = request.query["name"][0]
    if bucket is not None and name is not None and "upload_id" not in request.query:
      status = _precondition_status(request, storage, bucket, name, is_read)
      if status is not None:
        if is_read and status == HTTPStatus.PRECONDITION_FAILED and _current(storage, bucket, name)[0] == 0:
          status = HTTPStatus.NOT_FOUND  # a missing object is 404 whatever the precondition
        response.status = status
        if status == HTTPStatus.PRECONDITION_FAILED:
          response.json({"error": {"code": 412, "message": "Precondition Failed"}})
        return None
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _with_empty_media(handler):
  """A media upload with no body stores an empty object, as GCS does (the stock handler crashes)."""
  def wrapped(request, response, storage, *args, **kwargs):
    if request.query.get("uploadType") == ["media"] and request.data is None:
      request._data = b""  # pylint: disable=protected-access
    return handler(request, response, storage, *args, **kwargs)
  return wrapped


def _with_generation_headers(handler):
  """Media downloads carry the object's generation headers, as GCS's do."""
  def wrapped(request, response, storage, *args, **kwargs):
    out = handler(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
      response["x-goog-stored-content-length"] = str(obj["size"])
      response["x-goog-storage-class"] = obj.get("storageClass", "STANDARD")
    return out
  return wrapped


def _patch_handlers() -> None:
  """Rewrites the emulator's route table in this process (the emulator runs in its own subprocess)."""
  from gcp_storage_emulator import server as emu_server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  # objects.get serves both metadata and `alt=media` (which it forwards to objects.download).
  download = _with_preconditions(_with_generation_headers(objects.download), is_read=True)
  get = objects.get

  def get_or_download(request, response, storage, *args, **kwargs):
    if request.query.get("alt") and request.query["alt"][0] == "media":
      return download(request, response, storage, *args, **kwargs)
    return _with_preconditions(get, is_read=True)(request, response, storage, *args, **kwargs)

  replace = {objects.download: download, objects.get: get_or_download,
             objects.insert: _with_preconditions(_with_empty_media(objects.insert), is_read=False),
             objects.delete: _with_preconditions(objects.delete, is_read=False),
             objects.patch: _with_preconditions(objects.patch, is_read=False)}
  emu_server.HANDLERS = tuple((regex, {m: replace.get(h, h) for m, h in methods.items()})
                              for regex, methods in emu_server.HANDLERS)


def _handler_class():
  from gcp_storage_emulator import server as emu_server  # pylint: disable=g-import-not-at-top

  class Handler(emu_server.RequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and `Expect: 100-continue`, like GCS

    def _serve(self, method):
      with _LOCK:
        emu_server.Router(self).handle(method)

    def do_GET(self):
      self._serve("GET")

    def do_POST(self):
      self._serve("POST")

    def do_PUT(self):
      self._serve("PUT")

    def do_DELETE(self):
      self._serve("DELETE")

    def do_PATCH(self):
      self._serve("PATCH")

  return Handler


def serve(bucket: str, port: int = 0) -> None:
  from gcp_storage_emulator.handlers import buckets  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.storage import Storage  # pylint: disable=g-import-not-at-top
  _patch_handlers()
  storage = Storage(use_memory_fs=True, data_dir="/")
  buckets.create_bucket(bucket, storage)

  class Server(http_server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

  httpd = Server(("127.0.0.1", port), functools.partial(_handler_class(), storage))
  print(f"PORT {httpd.server_address[1]}", flush=True)
  httpd.serve_forever()


def client_env(port: int) -> dict[str, str]:
  """Environment that points tensorstore and gcsfs at the emulator (test-only; real GCS needs none of it)."""
  url = f"http://127.0.0.1:{port}"
  return {
      "TENSORSTORE_GCS_HTTP_URL": url,          # tensorstore's gcs driver (orbax arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: a fixed bearer token instead of ADC lookup
      "STORAGE_EMULATOR_HOST": url,             # gcsfs / google-cloud-storage: endpoint, anonymous access
      "EPATH_USE_TF": "false",                  # etils.epath: gs:// via fsspec/gcsfs, not tf.io.gfile
      # gcsfs's extended filesystem asks the Storage Control gRPC API for the bucket layout on every call;
      # the emulator serves only the JSON API, so use the plain JSON-API filesystem.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }


def set_env(values: dict[str, str | None]) -> dict[str, str | None]:
  """Sets (a value) or removes (None) environment variables; returns the previous values.

  Also makes etils decide again whether gs:// goes through tf.io.gfile: it decides once per process
  (functools.cache, at the first path operation of any kind), so a test that changes EPATH_USE_TF or
  the emulator variables after earlier tests used epath must reset it (and again when restoring).
  """
  from etils.epath import gpath as epath_gpath  # pylint: disable=g-import-not-at-top
  old = {k: os.environ.get(k) for k in values}
  for k, v in values.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  return old


class Emulator:
  """A running emulator subprocess: `.port`, `.env`, `.stop()`."""

  def __init__(self, bucket: str, timeout: float = 30.0):
    self.bucket = bucket
    self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), f"--bucket={bucket}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    line = self._proc.stdout.readline()
    if not line.startswith("PORT "):
      self._proc.kill()
      raise RuntimeError(f"GCS emulator did not start (rc={self._proc.poll()}, said {line!r})")
    self.port = int(line.split()[1])
    while True:  # accepts connections?
      try:
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        break
      except OSError:
        if time.time() > deadline:
          self.stop()
          raise
        time.sleep(0.05)
    self.env = client_env(self.port)

  def object(self, name: str) -> dict | None:
    """An object's metadata straight from the JSON API (no client-side listing caches), or None."""
    import json  # pylint: disable=g-import-not-at-top
    import urllib.error  # pylint: disable=g-import-not-at-top
    import urllib.parse  # pylint: disable=g-import-not-at-top
    import urllib.request  # pylint: disable=g-import-not-at-top
    url = (f"http://127.0.0.1:{self.port}/storage/v1/b/{self.bucket}/o/"
           f"{urllib.parse.quote(name, safe='')}")
    try:
      with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return None
      raise

  def stop(self) -> None:
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._proc.stdout.close()


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args()
  serve(args.bucket, args.port)
