"""The package's layers import only downwards, and packages of one layer form no cycle.

Layers, bottom to top (docs/ARCHITECTURE.md):
  core <- models <- policies <- text / weights / data <- training / inference
  <- evaluation / serving <- sim <- entry points (train, export, evaluate, evaluate_sim, evaluate_language, smoke, serve)
Every import of `m2vla_jax` is read from the source (function-level and relative imports included),
so a lazy import cannot hide an upward dependency.
"""
import ast
import pathlib

import pytest
import support

PACKAGE = support.REPO / "m2vla_jax"

LAYERS = {
    "core": 0,
    "models": 1,
    "policies": 2,
    "text": 3, "weights": 3, "data": 3,
    "training": 4, "inference": 4,
    "evaluation": 5, "serving": 5,
    "sim": 6,
    "train": 7, "export": 7, "evaluate": 7, "evaluate_sim": 7, "evaluate_language": 7, "smoke": 7, "serve": 7,
}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root.parent).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imports(root: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package modules it imports (absolute names), for every .py file under root."""
  out = {}
  for path in sorted(root.rglob("*.py")):
    module = _module_name(path, root)
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.split(".")[0] == root.name}
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = module.split(".") if is_pkg else module.split(".")[:-1]
          base = base[:len(base) - (node.level - 1)]
          target = ".".join(base + ([node.module] if node.module else []))
        else:
          target = node.module or ""
        if target.split(".")[0] != root.name:
          continue
        found.add(target)
        found |= {f"{target}.{a.name}" for a in node.names}
    out[module] = found
  return out


def _top(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def violations(root: pathlib.Path, layers: dict[str, int]) -> list[str]:
  """Upward imports, modules outside every layer, and cycles between same-layer packages."""
  graph = imports(root)
  known = {_top(m) for m in graph if _top(m)}
  problems = [f"{root.name}.{t} is in no layer; add it to LAYERS" for t in sorted(known - set(layers))]
  edges, reported = {}, set()
  for module, targets in graph.items():
    src = _top(module)
    if src is None or src not in layers:
      continue
    for target in sorted(targets, key=len):      # 'pkg.sim' before 'pkg.sim.runner'
      dst = _top(target)
      if dst is None or dst == src or dst not in known:
        continue        # the package root, itself, or a name imported from a module
      if layers.get(dst, -1) > layers[src] and (module, dst) not in reported:
        reported.add((module, dst))                  # one report per module and package
        problems.append(f"{module} imports {target}: layer {src} ({layers[src]}) may not import "
                        f"{dst} ({layers[dst]})")
      edges.setdefault(src, set()).add(dst)
  # Cycles among top-level packages (only possible within one layer once nothing points up).
  def reach(a, b, seen):
    return any(n == b or (n not in seen and reach(n, b, seen | {n})) for n in edges.get(a, ()))
  for a in sorted(edges):
    for b in sorted(edges[a]):
      if a < b and reach(b, a, {b}):
        problems.append(f"cycle between {a} and {b}")
  return problems


def test_the_package_imports_only_downwards():
  assert violations(PACKAGE, LAYERS) == []


def test_the_check_finds_a_planted_upward_import_and_cycle(tmp_path):
  pkg = tmp_path / "pkg"
  for name, body in {
      "__init__.py": "",
      "core/__init__.py": "",
      "core/a.py": "from pkg.sim import runner\n",           # upward: core -> sim
      "data/__init__.py": "",
      "data/reader.py": "def f():\n  from ..text import tok\n",  # relative, lazy: data -> text
      "text/__init__.py": "",
      "text/tok.py": "import pkg.data.reader\n",              # text -> data: a cycle in layer 3
      "sim/__init__.py": "",
      "sim/runner.py": "from pkg.core import a\n",            # downward: fine
      "extra.py": "",                                          # in no layer
  }.items():
    (pkg / name).parent.mkdir(parents=True, exist_ok=True)
    (pkg / name).write_text(body)
  found = violations(pkg, {"core": 0, "text": 3, "data": 3, "sim": 6})
  assert any("pkg.core.a imports pkg.sim" in p for p in found), found
  assert "cycle between data and text" in found, found
  assert "pkg.extra is in no layer; add it to LAYERS" in found, found
  assert not any(p.startswith("pkg.sim.runner") for p in found), found
  # core -> sim is upward, and with sim -> core also a cycle: both reported.
  assert "cycle between core and sim" in found and len(found) == 4, found


@pytest.mark.parametrize("module,layer", [("m2vla_jax.policies.m2vla", "policies"),
                                          ("m2vla_jax.models.vlm", "models")])
def test_import_reader_sees_real_imports(module, layer):
  # The reader must see what it claims to check: the policy imports the models below it.
  graph = imports(PACKAGE)
  assert module in graph and _top(module) == layer
  if layer == "policies":
    assert any(t.startswith("m2vla_jax.models.") for t in graph[module])


def simulator_violations(graph: dict[str, set[str]], package: str = "m2vla_jax") -> list[str]:
  """Inside sim/: each simulator folder (metaworld, mjx, libero) may import `sim.common` but no other
  simulator, and `sim.common` imports no simulator, so a simulator can be removed without the others
  noticing."""
  def folder(module):
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == [package, "sim"] else None
  problems = []
  for module, targets in graph.items():
    src = folder(module)
    for target in sorted(targets) if src else ():
      dst = folder(target)
      if dst in (None, src, "common"):
        continue
      allowed = "no simulator" if src == "common" else "sim/common only"
      problems.append(f"{module} imports {target}: sim/{src} may import {allowed}")
  return problems


def test_simulators_share_only_sim_common():
  assert simulator_violations(imports(PACKAGE)) == []


def test_the_simulator_check_finds_a_planted_cross_import():
  graph = {"m2vla_jax.sim.mjx.workflow": {"m2vla_jax.sim.common.phases", "m2vla_jax.sim.metaworld.demos"},
           "m2vla_jax.sim.common.phases": {"m2vla_jax.sim.libero"},
           "m2vla_jax.sim.libero.env": {"m2vla_jax.sim.common.worker", "m2vla_jax.core.tree_util"}}
  assert simulator_violations(graph) == [
      "m2vla_jax.sim.mjx.workflow imports m2vla_jax.sim.metaworld.demos: sim/mjx may import sim/common only",
      "m2vla_jax.sim.common.phases imports m2vla_jax.sim.libero: sim/common may import no simulator"]
