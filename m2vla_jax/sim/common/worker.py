"""A simulator in its own Python process, driven over pipes: the client half and the worker's loop.

Owns the protocol both simulators' `ProcessEnv` speak (Meta-World: TensorFlow and Mesa's EGL must not
share a process; LIBERO: robosuite prints, and can run under another interpreter). Requests are
pickled tuples `(command, *args)` on the worker's stdin; replies are pickled `(status, payload,
extras)` on a duplicate of its stdout, with the real stdout pointed at stderr so that stray prints
cannot corrupt the protocol. `extras` is a small dict the worker attaches to every reply (e.g. the
episode's step count) and the client keeps as attributes.

Commands every worker understands: 'init' (build the environment, reply with what `describe`
returns), 'call' (one of the environment's named remote functions), 'close'; the simulator adds its
own ('reset', 'step', 'render', ...) as handlers. An exception in the worker is pickled (or, if it
cannot be, turned into a RuntimeError naming its type) and re-raised in the client with its type; a
dead worker raises RuntimeError naming the environment.

This module imports nothing heavy: the worker process imports it before the simulator.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any, Callable, Mapping


class WorkerClient:
  """The client half: starts `python -m <module>` and exchanges requests with its `serve` loop.

  Subclasses give the simulator's interface (reset / step / ...) on top of `request` and
  `step_async` / `step_wait`, which split a request so that several workers run in parallel.
  """

  def __init__(self, module: str, label: str, remote_functions: Mapping[str, Any], *,
               python: str | None = None, env: Mapping[str, str] | None = None,
               close_timeout_s: float = 10.0):
    self.label = label
    self._remote_functions = tuple(remote_functions)
    self._close_timeout_s = close_timeout_s
    self._pending = False
    self._proc = subprocess.Popen([python or sys.executable, "-m", module], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=dict(env or os.environ))

  def _extras(self, extras: Mapping[str, Any]) -> None:
    for k, v in extras.items():
      setattr(self, k, v)

  def _send(self, *msg) -> None:
    if self._proc is None:
      raise RuntimeError(f"{self.label}: environment is closed")
    try:
      pickle.dump(msg, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
      self._proc.stdin.flush()
    except (BrokenPipeError, OSError) as e:
      raise RuntimeError(f"{self.label}: environment worker died (exit code "
                         f"{self._proc.poll()})") from e

  def _receive(self) -> Any:
    try:
      status, payload, extras = pickle.load(self._proc.stdout)
    except (EOFError, pickle.UnpicklingError) as e:
      raise RuntimeError(f"{self.label}: environment worker died (exit code "
                         f"{self._proc.wait()}); its stderr says why") from e
    self._extras(extras)
    if status == "error":
      raise payload
    return payload

  def request(self, *msg) -> Any:
    if self._pending:
      raise RuntimeError(f"{self.label}: step_async is pending; call step_wait first")
    self._send(*msg)
    return self._receive()

  def step_async(self, *args) -> None:
    self._send("step", *args)
    self._pending = True

  def step_wait(self):
    self._pending = False
    return self._receive()

  def call(self, function: str, *args) -> Any:
    """Runs `function(env, *args)` in the worker; `function` names one of its remote functions."""
    if function not in self._remote_functions:
      raise ValueError(f"function={function!r}; use one of {sorted(self._remote_functions)}")
    return self.request("call", function, *args)

  def close(self) -> None:
    if self._proc is None:
      return
    try:
      if self._pending:
        self.step_wait()
      self.request("close")
    except Exception:  # pylint: disable=broad-except
      pass  # closing a crashed worker: nothing to say goodbye to
    finally:
      try:
        self._proc.stdin.close()
        self._proc.wait(timeout=self._close_timeout_s)
      except Exception:  # pylint: disable=broad-except
        self._proc.kill()
        self._proc.wait()
      self._proc = None

  def __del__(self):
    if getattr(self, "_proc", None) is not None:
      self.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def serve(make_env: Callable[..., Any], describe: Callable[[Any], Any],
          handlers: Mapping[str, Callable[..., Any]], remote_functions: Mapping[str, Callable[..., Any]],
          extras: Callable[[Any], dict]) -> None:
  """The worker loop: builds the environment on 'init', answers requests until 'close' or EOF.

  Args:
    make_env: the 'init' arguments -> environment (the previous one is closed first).
    describe: environment -> the 'init' reply (e.g. its step limit).
    handlers: command -> fn(env, *args) -> reply payload.
    remote_functions: name -> fn(env, *args), run by 'call'.
    extras: environment or None -> the dict attached to every reply.
  """
  requests = sys.stdin.buffer
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the protocol
  env = None

  def reply(status, payload):
    pickle.dump((status, payload, extras(env)), replies, protocol=pickle.HIGHEST_PROTOCOL)
    replies.flush()

  while True:
    try:
      msg = pickle.load(requests)
    except EOFError:
      break
    command, args = msg[0], msg[1:]
    try:
      if command == "init":
        if env is not None:
          env.close()
          env = None
        env = make_env(*args)
        reply("ok", describe(env))
      elif command == "call":
        reply("ok", remote_functions[args[0]](env, *args[1:]))
      elif command == "close":
        env.close()
        env = None
        reply("ok", None)
        break
      elif command in handlers:
        reply("ok", handlers[command](env, *args))
      else:
        reply("error", ValueError(f"unknown command {command!r}"))
    except Exception as e:  # pylint: disable=broad-except
      try:
        pickle.dumps(e)
      except Exception:  # pylint: disable=broad-except
        e = RuntimeError(f"{type(e).__name__}: {e}")
      reply("error", e)
  replies.close()
  sys.stdout.flush()
  sys.stderr.flush()
