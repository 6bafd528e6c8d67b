"""Points TensorFlow's own gs:// filesystem at the GCS emulator: an HTTPS proxy that terminates TLS.

TensorFlow's GCS filesystem (`tf.io.gfile`, `tf.data.TFRecordDataset`, every TF op that opens a gs://
path) talks to the fixed endpoints `https://www.googleapis.com/storage/v1/` (metadata, listing, rewrite),
`https://www.googleapis.com/upload/storage/v1/` (uploads) and `https://storage.googleapis.com/<bucket>/`
(object reads); TF 2.21 has no variable that changes them (unlike tensorstore's `TENSORSTORE_GCS_HTTP_URL`
or gcsfs's `STORAGE_EMULATOR_HOST`). Its libcurl does honour `https_proxy` and `CURL_CA_BUNDLE`, so
`TlsProxy` is what it gets instead: a loopback proxy that answers `CONNECT host:443`, completes the TLS
handshake itself with a certificate for those hosts signed by a throwaway CA (written to a temporary
file that `CURL_CA_BUNDLE` names), and forwards each decrypted request unchanged, as plain HTTP, to the
emulator, which serves the same paths (`gcp-storage-emulator` routes `/<bucket>/<object>` downloads too).
Two fix-ups on the way: TF sends upload bodies chunked *and* with a `Content-Length` (chunked wins, but the
emulator reads the length), so bodies are de-chunked; the emulator builds a resumable upload's `Location`
as `http://<Host>/...`, which TF would then request without the proxy, so it is answered as `https://`.

Test-only: on real GCS nothing here runs, and TF needs none of these variables.
"""
from __future__ import annotations

import datetime
import http.client
import os
import ssl
import tempfile
import threading
from http import server as http_server

GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
               "upgrade", "proxy-authorization", "proxy-authenticate"}


def _write_certificate(directory: str) -> tuple[str, str, str]:
  """(CA certificate, server certificate, server key) PEM paths: a fresh CA and a leaf for GCS_HOSTS."""
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  now = datetime.datetime.now(datetime.timezone.utc)
  validity = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=7))

  def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

  ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
  ca = (x509.CertificateBuilder().subject_name(name("m2vla test CA")).issuer_name(name("m2vla test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(validity[0]).not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
  leaf = (x509.CertificateBuilder().subject_name(name(GCS_HOSTS[0])).issuer_name(ca.subject)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(validity[0]).not_valid_after(validity[1])
          .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in GCS_HOSTS]), critical=False)
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
  paths = [os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key")]
  with open(paths[0], "wb") as f:
    f.write(ca.public_bytes(serialization.Encoding.PEM))
  with open(paths[1], "wb") as f:
    f.write(leaf.public_bytes(serialization.Encoding.PEM))
  with open(paths[2], "wb") as f:
    f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  return paths[0], paths[1], paths[2]


def _https_location(url: str) -> str:
  """A resumable upload's session URL, which TF requests next, with the scheme GCS gives it."""
  for host in GCS_HOSTS:
    if url.startswith(f"http://{host}/"):
      return "https" + url[len("http"):]
  return url


def _handler_class(tls: ssl.SSLContext, upstream_port: int, requests: list):

  class Handler(http_server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and `Expect: 100-continue`, as curl expects of GCS

    def log_message(self, *args):  # pylint: disable=arguments-differ
      pass

    def do_CONNECT(self):
      host = self.path.rsplit(":", 1)[0]
      if host not in GCS_HOSTS:
        self.send_error(403, f"only {GCS_HOSTS} are proxied")
        return
      self.tunnel_host = host
      self.send_response(200, "Connection established")
      self.end_headers()
      self.wfile.flush()
      # From here on the same connection carries TLS; keep serving requests on it.
      self.connection = tls.wrap_socket(self.connection, server_side=True)
      self.rfile = self.connection.makefile("rb", self.rbufsize)
      self.wfile = self.connection.makefile("wb", self.wbufsize)
      self.close_connection = False

    def _read_chunked(self) -> bytes:
      parts = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
          return b"".join(parts)
        parts.append(self.rfile.read(size))
        self.rfile.readline()  # the CRLF after each chunk

    def _forward(self):
      if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
        # TF's uploads send chunked bodies with a Content-Length header too; chunked wins (RFC 9112).
        body = self._read_chunked()
      else:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
      headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"expect"}}
      requests.append((getattr(self, "tunnel_host", None), self.command, self.path))
      conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
      try:
        try:
          conn.request(self.command, self.path, body=body, headers=headers)
          resp = conn.getresponse()
          data = resp.read()
        except (OSError, http.client.HTTPException) as e:  # the emulator failed: a gateway error
          self.send_error(502, f"emulator: {e!r}")
          return
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
          if k.lower() == "location":  # the emulator builds it as http://<Host>; GCS's are https
            v = _https_location(v)
          if k.lower() not in _HOP_BY_HOP | {"content-length"}:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
          self.wfile.write(data)
        self.wfile.flush()
      finally:
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

  return Handler


class TlsProxy:
  """A running proxy for the emulator on `upstream_port`: `.env` for TF's libcurl, `.stop()`.

  `.requests` lists (host, method, path) of every request TF sent through it, in arrival order.
  """

  def __init__(self, upstream_port: int):
    self._dir = tempfile.TemporaryDirectory(prefix="gcs_tls_proxy_")
    ca, cert, key = _write_certificate(self._dir.name)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    class Server(http_server.ThreadingHTTPServer):
      daemon_threads = True
      request_queue_size = 128

    self.requests: list[tuple[str | None, str, str]] = []
    self._httpd = Server(("127.0.0.1", 0), _handler_class(tls, upstream_port, self.requests))
    self.port = self._httpd.server_address[1]
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()
    url = f"http://127.0.0.1:{self.port}"
    self.env = {
        "https_proxy": url,       # TF's libcurl: every https request goes through CONNECT to us
        "HTTPS_PROXY": url,
        "CURL_CA_BUNDLE": ca,     # TF's libcurl: trust the throwaway CA instead of the system's
        # Loopback stays direct: gcsfs and tensorstore already talk plain HTTP to the emulator.
        "no_proxy": "127.0.0.1,localhost",
        "NO_PROXY": "127.0.0.1,localhost",
    }

  def stop(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=10)
    self._dir.cleanup()
