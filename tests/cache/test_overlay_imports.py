"""The caller's private importer of one overlay (issue 12): real site folders unpacked from the real
test wheels, no worker; nothing it loads may reach this process's import system."""
from __future__ import annotations

import importlib.util
import sys
import threading
import zipfile

import pytest

from flowhub.cache import overlay_imports
from flowhub.errors import OverlayImportError
from wheelhouse import wheel_dir


def _site(tmp_path, *wheels, extra=None):
    site = tmp_path / "site"
    site.mkdir(parents=True)
    for pattern in wheels:
        (whl,) = wheel_dir().glob(pattern)
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    for name, text in (extra or {}).items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (site / "bin").mkdir()
    (site / "bin" / "tabulate").write_text("#!/bin/sh\n")  # a script folder is no package
    return str(site)


def _untouched(names=("six", "tabulate", "nspkg", "rel", "hooks", "pathy")):
    assert not {m for m in sys.modules if m.split(".")[0] in names}
    assert all(importlib.util.find_spec(n) is None for n in names)


def test_it_loads_modules_privately_with_relative_and_function_level_imports(tmp_path):
    site = _site(tmp_path, "six-1.16.0-*.whl", "tabulate-0.9.0-*.whl", extra={
        "nspkg/part.py": "VALUE = 'ns'\n",  # a namespace package
        "rel/__init__.py": "from .inner import deep\nfrom . import inner\nfrom .inner import *\n",
        "rel/inner/__init__.py": "__all__ = ['star']\nstar = 'star'\nfrom ..inner import deep\n",
        "rel/inner/deep.py": "import six\nfrom six.moves import range as six_range\n"
                             "def later():\n    import tabulate.version\n    return tabulate.version.version\n"})
    finders = list(sys.meta_path)
    importer = overlay_imports.PrivateImporter(site)
    assert importer.names == {"six", "tabulate", "nspkg", "rel"}
    importer.preload()
    rel = importer.modules["rel"]
    assert rel.inner.deep is importer.modules["rel.inner.deep"] and rel.star == "star"
    deep = rel.deep
    assert deep.six is importer.modules["six"] and deep.six.__version__ == "1.16.0" and deep.six_range is range
    assert deep.later() == "0.9.0" and importer.modules["tabulate"].__version__ == "0.9.0"
    assert importer.import_module("nspkg.part").VALUE == "ns"
    assert importer.import_module("six.moves") is importer.modules["six"].moves  # served as an attribute
    # the caller's own import system never sees any of it
    assert sys.meta_path == finders  # six's meta path finder was dropped
    _untouched()
    with pytest.raises(ModuleNotFoundError):
        importer.import_module("rel.missing")
    # code rebuilt with the importer's builtins imports privately, at call time
    namespace = {"__builtins__": importer.builtins, "__name__": "rebuilt"}
    exec("def f():\n    import six, json\n    from tabulate import tabulate\n    return six, json, tabulate", namespace)
    six, json, tabulate = namespace["f"]()
    assert six is importer.modules["six"] and json is sys.modules["json"]
    assert tabulate is importer.modules["tabulate"].tabulate


def test_one_private_set_per_overlay_and_distinct_sets_side_by_side(tmp_path):
    new = _site(tmp_path / "new", "six-1.16.0-*.whl")
    old = _site(tmp_path / "old", "six-1.15.0-*.whl")
    assert overlay_imports.for_site(new) is overlay_imports.for_site(new + "/")
    six_new = overlay_imports.for_site(new).import_module("six")
    six_old = overlay_imports.for_site(old).import_module("six")
    assert (six_new.__version__, six_old.__version__) == ("1.16.0", "1.15.0") and six_new is not six_old
    _untouched()


def test_concurrent_first_imports_get_one_module(tmp_path):
    importer = overlay_imports.PrivateImporter(_site(tmp_path, "tabulate-0.9.0-*.whl"))
    start, got = threading.Barrier(8), []

    def use():
        start.wait()
        got.append(importer.import_module("tabulate.version"))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(m is got[0] for m in got)
    assert importer.modules["tabulate"].__version__ == "0.9.0"
    _untouched()


@pytest.mark.parametrize("code, why", [
    ("import sys, types\nsys.modules[__name__] = types.ModuleType(__name__)\n", "registered hooks in sys.modules"),
    ("import os, sys\nsys.path.append(os.path.dirname(__file__))\n", "on sys.path"),
    ("import importlib\nimportlib.import_module('hooks._impl')\n", "No module named 'hooks'"),
])
def test_a_module_that_needs_the_shared_import_system_is_refused_and_leaves_nothing(tmp_path, code, why):
    path = list(sys.path)
    importer = overlay_imports.PrivateImporter(_site(tmp_path, extra={"hooks/__init__.py": code,
                                                                      "hooks/_impl.py": ""}))
    with pytest.raises(OverlayImportError, match=why) as info:
        importer.preload()
    assert info.value.module == "hooks" and info.value.site == importer.site
    assert "hooks" not in importer.modules and sys.path == path
    _untouched()


def test_a_module_that_fails_after_changing_the_import_system_leaves_nothing(tmp_path):
    path, finders = list(sys.path), list(sys.meta_path)
    code = ("import os, sys, types\nsys.path.append(os.path.dirname(__file__))\n"
            "sys.modules['pathy.sub'] = types.ModuleType('pathy.sub')\nraise RuntimeError('broken')\n")
    importer = overlay_imports.PrivateImporter(_site(tmp_path, extra={"pathy/__init__.py": code}))
    with pytest.raises(OverlayImportError, match=r"RuntimeError: broken"):
        importer.preload()
    assert sys.path == path and sys.meta_path == finders and not importer.modules
    _untouched()
