"""The package's shape, checked: layers (import-linter's contract in setup.cfg), no import cycles, no
private name used across modules, no module too long to read in one sitting."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import grimp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "flowhub")
MAX_LINES = 500


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def test_layers_contract_is_kept():
    lint = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    proc = subprocess.run([lint, "--config", os.path.join(ROOT, "setup.cfg"), "--no-cache"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_no_import_cycles():
    graph = grimp.build_graph("flowhub", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.append(f"{module} -> {imported} -> ... -> {module}")
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_the_package_root():
    graph = grimp.build_graph("flowhub", cache_dir=None)
    offenders = [m for m in graph.find_modules_that_directly_import("flowhub") if m != "flowhub"]
    assert not offenders, offenders


@pytest.mark.parametrize("module, path", sorted(_modules()))
def test_module_is_short_and_keeps_its_private_names(module, path):
    with open(path) as f:
        text = f.read()
    assert text.count("\n") <= MAX_LINES, f"{module} has {text.count(chr(10))} lines (at most {MAX_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowhub"):
            for alias in node.names:
                target = os.path.join(ROOT, *node.module.split("."), alias.name)
                is_module = os.path.isdir(target) or os.path.exists(target + ".py")
                assert not alias.name.startswith("_") or alias.name.startswith("__") or is_module, \
                    f"{module} imports the private name {alias.name} from {node.module}"


def test_importing_flowhub_is_cheap():
    """No numpy, oneflow or thread at ``import flowhub``: a caller's zygote may still be forked from it."""
    code = ("import os, sys; import flowhub; "
            "print(sorted(m for m in ('numpy', 'oneflow', 'cloudpickle') if m in sys.modules), "
            "len(os.listdir('/proc/self/task')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["[]", "1"], proc.stdout
