"""Test helpers for requirement overlays: a few real small wheels from PyPI (downloaded once into
``~/.cache/flowhub/test-wheels`` at set-up, never at test time afterwards), a source-only package built
here, a PEP 503 index of them served on loopback by a real HTTP server, and flowvision-shaped repos."""
from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Dict, Iterator

import pytest

#: Two versions of one tiny pure-Python package, and a second package.
WHEELS = ("six==1.16.0", "six==1.15.0", "tabulate==0.9.0")
#: A package with no wheel at all (an sdist only); its setup.py leaves a file behind if it ever runs.
SDIST_ONLY = "nowheel-pkg"
#: Wheels built here whose modules work as ordinary imports, never as private ones. ``lazytop`` replaces
#: itself in ``sys.modules`` with a lazily filled stand-in (as large libraries do); ``lazysub`` imports
#: fine, but its submodule ``lazysub.lazy``, which the model's module uses, loads its implementation by
#: name through ``importlib.import_module`` (as plug-in registries do).
NOT_PRIVATE = ("lazytop", "lazysub")
LAZY_SUBMODULE = '''"""Loads its implementation by name, through the import system."""
import importlib

answer = importlib.import_module(__name__.rpartition(".")[0] + "._impl").ANSWER
'''
LAZY_MODULE = '''"""Fills itself lazily: the module in sys.modules is a stand-in of another class."""
import sys
import types


class _LazyModule(types.ModuleType):
    def __getattr__(self, name):
        if name == "answer":
            return 42
        raise AttributeError(name)


sys.modules[__name__] = _LazyModule(__name__)
'''


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


def build_wheel(folder: Path, name: str, version: str, files: Dict[str, str]) -> Path:
    """A real pure-Python wheel of ``files`` (path -> text), with its metadata and a hashed RECORD."""
    info = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    members[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: flowhub-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for member, text in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{member},sha256={digest},{len(text.encode())}")
    members[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for member, text in members.items():
            whl.writestr(member, text)
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
    lazy_files = {"lazytop": {"lazytop/__init__.py": LAZY_MODULE},
                  "lazysub": {"lazysub/__init__.py": "", "lazysub/lazy.py": LAZY_SUBMODULE,
                              "lazysub/_impl.py": "ANSWER = 42\n"}}
    for name, files in lazy_files.items():
        (root / "simple" / name).mkdir(parents=True)
        build_wheel(root / "simple" / name, name, "1.0", files)
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


FANCY = '''
import tabulate
import oneflow as flow


class Caption(tabulate.JupyterHTMLStr):
    """A class of the repo that subclasses a class of an overlay package."""


class Fancy(flow.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = flow.nn.Linear(2, 2)
        self.caption = Caption("<b>fancy</b>")
        self.fmt = tabulate.simple_separated_format("|")  # an object of an overlay package, held by the model

    def forward(self, x):
        import six  # a function-level import of an overlay package, run at call time

        return self.fc(x) * (2 if six.PY3 else 0)

    def report(self):
        import six
        from tabulate import tabulate as table

        return {"subclass": isinstance(self.caption, tabulate.JupyterHTMLStr), "six": six.__version__,
                "six_file": six.__file__, "table": table([["fc", 2]], tablefmt=self.fmt)}
'''

FANCY_HUBCONF = '''
from flowpkg.fancy import Fancy


def fancy():
    """A model whose class uses overlay objects and whose forward imports six."""
    return Fancy()
'''

LAZY = '''
{import_line}
import oneflow as flow


class UsesLazy(flow.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = flow.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x)

    def answer(self):
        return lazy.answer
'''

LAZY_HUBCONF = '''
from flowpkg.lazy import UsesLazy


def lazy():
    """A model of a package that only works as an ordinary import."""
    return UsesLazy()
'''


def flowvision_like(six: str = "six==1.16.0", extra: str = "", fancy: bool = False) -> Dict[str, str]:
    """Files of a repo shaped like flowvision: hubconf imports a package of the repo that imports two
    small PyPI packages, declared only in setup.py (``six``: the six requirement; ``extra``: one more).
    ``fancy``: a ``fancy`` entrypoint whose model uses overlay objects (:data:`FANCY`); with
    with ``extra`` one of :data:`NOT_PRIVATE`, a ``lazy`` entrypoint whose model uses that package."""
    setup = SETUP_PY.format(six=six)
    files = {"hubconf.py": HUBCONF, "flowpkg/__init__.py": "", "flowpkg/models.py": MODELS}
    if extra:
        setup = setup.replace('requirements.append("tabulate")', f'requirements.append("tabulate")\nrequirements.append("{extra}")')
    if extra in NOT_PRIVATE:
        files["hubconf.py"] += LAZY_HUBCONF
        lazy_import = "import lazytop as lazy" if extra == "lazytop" else f"from {extra} import lazy"
        files["flowpkg/lazy.py"] = LAZY.format(import_line=lazy_import)
    if fancy:
        files["hubconf.py"] += FANCY_HUBCONF
        files["flowpkg/fancy.py"] = FANCY
    files["setup.py"] = setup
    return files
