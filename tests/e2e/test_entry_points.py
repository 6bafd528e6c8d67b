"""Every console script setup.py declares runs: its function answers --help without starting work (the
same functions run behind `python -m m2vla_jax.<module>`)."""
import ast
import os
import subprocess
import sys

import pytest
import support

REPO = str(support.REPO)


def _console_scripts():
  tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "CONSOLE_SCRIPTS" for t in node.targets):
      return [ast.literal_eval(e) for e in node.value.elts]
  raise AssertionError("setup.py has no CONSOLE_SCRIPTS list")


SCRIPTS = _console_scripts()


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_resolves_and_its_module_answers_help(script):
  name, target = (x.strip() for x in script.split("=", 1))
  assert name.startswith("m2vla-")
  module, func = target.split(":")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # The console function itself with --help, one process per entry point (absl flags are
  # process-global and two entry points define --out).
  run = f"import sys; sys.argv = [{name!r}, '--help']; import {module} as m; m.{func}()"
  out = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=REPO, env=env,
                       timeout=300)
  text = out.stdout + out.stderr
  # absl exits 1 after --help, argparse 0; either way usage text and no traceback.
  assert out.returncode in (0, 1) and "Traceback" not in text, text[-2000:]
  assert "--" in text and ("usage" in text.lower() or "flags" in text.lower()), text[-2000:]


def test_console_script_names_are_unique():
  names = [s.split("=")[0].strip() for s in SCRIPTS]
  assert len(set(names)) == len(names)
