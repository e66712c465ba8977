"""Test helpers for requirement overlays: a few real small wheels from PyPI (downloaded once into
``~/.cache/flowhub/test-wheels`` at set-up, never at test time afterwards), a source-only package built
here, a PEP 503 index of them served on loopback by a real HTTP server, and flowvision-shaped repos."""
from __future__ import annotations

import functools
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

#: Two versions of one tiny pure-Python package, and a second package.
WHEELS = ("six==1.16.0", "six==1.15.0", "tabulate==0.9.0")
#: A package with no wheel at all (an sdist only); its setup.py leaves a file behind if it ever runs.
SDIST_ONLY = "nowheel-pkg"


def wheel_dir() -> Path:
    """The cached wheels of :data:`WHEELS` (downloaded with pip, once per machine)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flowhub" / "test-wheels"
    cache.mkdir(parents=True, exist_ok=True)
    for req in WHEELS:
        name, version = req.split("==")
        if not list(cache.glob(f"{name}-{version}-*.whl")):
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:",
                                   "--no-deps", "--disable-pip-version-check", "-d", str(cache), req],
                                  capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                pytest.fail(f"set-up: could not download the test wheel {req} from the package index once "
                            f"(needed a single time, then cached in {cache}):\n{proc.stderr[-2000:]}")
    return cache


def build_sdist(folder: Path, marker: Path) -> Path:
    """``nowheel_pkg-1.0.tar.gz``: a real sdist whose setup.py writes ``marker`` if anything runs it."""
    data = {"nowheel_pkg-1.0/setup.py": f"open({str(marker)!r}, 'w').write('ran')\n"
                                        "from setuptools import setup\nsetup(name='nowheel-pkg', version='1.0')\n",
            "nowheel_pkg-1.0/PKG-INFO": "Metadata-Version: 2.1\nName: nowheel-pkg\nVersion: 1.0\n"}
    path = folder / "nowheel_pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in data.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(raw), int(time.time())
            tar.addfile(info, io.BytesIO(raw))
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def simple_index(tmp_path_factory) -> Iterator[Dict[str, object]]:
    """A PEP 503 index (``/simple/<project>/``) of the test wheels and the sdist-only package, served by
    ``http.server`` on 127.0.0.1 (in a thread); yields its URL and the marker the sdist would write."""
    root = tmp_path_factory.mktemp("index")
    wheels = wheel_dir()
    for req in WHEELS:
        name, version = req.split("==")
        project = root / "simple" / name
        project.mkdir(parents=True, exist_ok=True)
        for whl in wheels.glob(f"{name}-{version}-*.whl"):
            (project / whl.name).write_bytes(whl.read_bytes())
    (root / "simple" / SDIST_ONLY).mkdir(parents=True)
    marker = tmp_path_factory.mktemp("marker") / "setup-py-ran"
    build_sdist(root / "simple" / SDIST_ONLY, marker)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="test-package-index", daemon=True)
    thread.start()  # a thread, not a process: nothing is left for the process checks of other tests
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/simple/", "marker": marker}
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def index_env(simple_index, monkeypatch, tmp_path_factory) -> Dict[str, object]:
    """pip (and so uv, through pip's configuration) sees only the loopback index: no config file of
    this machine, no other ``PIP_*`` variable."""
    for name in list(os.environ):
        if name.startswith(("PIP_", "UV_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", str(simple_index["url"]))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setenv("UV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "uv-cache"))
    monkeypatch.delenv("FLOWHUB_INSTALLER", raising=False)
    monkeypatch.delenv("FLOWHUB_INSTALL_REQUIREMENTS", raising=False)
    return simple_index


MODELS = '''
import six
import tabulate
import oneflow as flow


class Tiny(flow.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = flow.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)

    def versions(self):
        return {"six": six.__version__, "tabulate": tabulate.__version__, "six_file": six.__file__}

    def table(self):
        return tabulate.tabulate([["fc", 2]], headers=["layer", "out"])
'''

SETUP_PY = '''
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "SETUP_PY_RAN"), "w").write("x")
from setuptools import setup, find_packages

requirements = ["{six}"]
requirements.append("tabulate")
requirements.append(os.environ.get("EXTRA_REQUIREMENT", "rich"))  # computed: not read

if __name__ == "__main__":
    setup(name="flowpkg", version="0.1", packages=find_packages(), install_requires=requirements)
'''

HUBCONF = '''dependencies = ["oneflow"]

from flowpkg.models import Tiny


def tiny():
    """A tiny model whose package needs six and tabulate."""
    return Tiny()
'''


def flowvision_like(six: str = "six==1.16.0", extra: str = "") -> Dict[str, str]:
    """Files of a repo shaped like flowvision: hubconf imports a package of the repo that imports two
    small PyPI packages, declared only in setup.py (``six``: the six requirement)."""
    setup = SETUP_PY.format(six=six)
    if extra:
        setup = setup.replace('requirements.append("tabulate")', f'requirements.append("tabulate")\nrequirements.append("{extra}")')
    return {"hubconf.py": HUBCONF, "flowpkg/__init__.py": "", "flowpkg/models.py": MODELS, "setup.py": setup}
