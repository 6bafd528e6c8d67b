"""Entry point: serve a trained policy over a websocket (`serving/server.py` says how).

  python -m m2vla_jax.serve --bundle=DIR | --workdir=RUN [--step=N] [--host=127.0.0.1] [--port=8000]
      [--token=SECRET] [--max_batch=1] [--max_wait_ms=0] [--dataset=NAME] [--openpi_layout=libero]

Loads the policy through the one inference path (`InferencePolicy.from_bundle` / `from_workdir`),
compiles every batch size it will run, then prints `serving ws://HOST:PORT (warm-up S s)` and
accepts connections until SIGINT / SIGTERM. Binds loopback unless --host says otherwise; any other
host needs --token (clients send it in the X-M2VLA-Token header). Health: GET /healthz.
Clients: `m2vla_jax.serving.client.PolicyClient`; with --openpi_layout, openpi's own clients
(`openpi_client.WebsocketClientPolicy`, e.g. openpi's LIBERO example) instead.
"""
import asyncio
import signal

from absl import app
from absl import flags

from m2vla_jax.inference.policy import InferencePolicy
from m2vla_jax.serving import openpi
from m2vla_jax.serving import server as server_lib

_BUNDLE = flags.DEFINE_string("bundle", None, "Export bundle directory (local or gs://).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (local or gs://).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step with --workdir (default: newest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; anything but loopback needs --token.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port, printed at start).")
_TOKEN = flags.DEFINE_string("token", None, "Shared secret clients must send (X-M2VLA-Token header).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 1, "Most rows per model call; > 1 micro-batches "
                                  "concurrent requests.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 0.0, "How long to wait for requests to batch with.")
_DATASET = flags.DEFINE_string("dataset", None, "Statistics entry to normalize with (default: the only).")
_MAX_IMAGE_SIDE = flags.DEFINE_integer("max_image_side", server_lib.DEFAULT_MAX_IMAGE_SIDE,
                                       "Largest image H or W a request may send.")
_MAX_MESSAGE_MB = flags.DEFINE_float("max_message_mb", server_lib.DEFAULT_MAX_MESSAGE_BYTES / 2**20,
                                     "Largest request message; larger ones close that connection.")


_OPENPI_LAYOUT = flags.DEFINE_enum("openpi_layout", None, sorted(openpi.LAYOUTS),
                                   "Speak openpi's protocol with this observation layout (openpi's clients "
                                   "connect unchanged); unset: our protocol.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_BUNDLE.value) == bool(_WORKDIR.value):
    raise app.UsageError("pass exactly one of --bundle=DIR or --workdir=RUN")
  if _TOKEN.value is None and not server_lib.is_loopback(_HOST.value):
    raise app.UsageError(f"--host={_HOST.value} exposes the policy beyond this machine; pass "
                         "--token=SECRET as well")
  policy = (InferencePolicy.from_bundle(_BUNDLE.value) if _BUNDLE.value
            else InferencePolicy.from_workdir(_WORKDIR.value, _STEP.value))
  server = server_lib.PolicyServer(policy, max_batch=_MAX_BATCH.value, max_wait_ms=_MAX_WAIT_MS.value,
                                   dataset=_DATASET.value, max_image_side=_MAX_IMAGE_SIDE.value,
                                   token=_TOKEN.value, openpi_layout=_OPENPI_LAYOUT.value)
  warmup_s = server.warmup()        # before the port opens: no client sees a compile
  server.start()

  async def run():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    ready = lambda port: print(f"serving ws://{_HOST.value}:{port} (warm-up {warmup_s:.2f} s, "  # noqa: E731
                               f"batch sizes {list(server.buckets)})", flush=True)
    await server_lib.serve(server, _HOST.value, _PORT.value, on_ready=ready, stop=stop,
                           max_message_bytes=int(_MAX_MESSAGE_MB.value * 2**20))

  try:
    asyncio.run(run())
  finally:
    server.stop()


def cli():
  """Console script (`m2vla-serve` once setup.py lists it)."""
  app.run(main)


if __name__ == "__main__":
  cli()
