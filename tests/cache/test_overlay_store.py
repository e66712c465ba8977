"""Requirement overlays as cache entries: one install and one atomic publish however many processes
ask at once, and the package index pip is configured with."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from flowhub.cache import overlays
from wheelhouse import index_env, simple_index  # noqa: F401  (fixtures)

ENSURE = r'''
import json, sys
from flowhub import settings
from flowhub.cache import overlays
s = settings.resolve({"hub_dir": sys.argv[1]})
found = overlays.ensure(s, ["six==1.15.0", "tabulate"], "race")
sys.path.insert(0, found.site)
import six, tabulate
manifest = json.load(open(found.path + "/overlay.json"))
print(json.dumps([found.path, six.__version__, six.__file__, manifest["created"]]))
'''


def test_concurrent_processes_install_one_overlay_and_publish_it_once(index_env, tmp_path):
    hub_dir = tmp_path / "hub"
    procs = [subprocess.Popen([sys.executable, "-c", ENSURE, str(hub_dir)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    paths, versions, files, created = zip(*results)
    assert len(set(paths)) == 1 and set(versions) == {"1.15.0"}
    assert len(set(created)) == 1  # one install; the others waited on its lock and used what it published
    assert all(f.startswith(paths[0] + os.sep) for f in files)
    root = hub_dir / "overlays"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [os.path.basename(paths[0])]
    assert not list((root / ".flowhub" / "tmp").iterdir())


def test_pip_configured_index_becomes_the_installer_options(monkeypatch, tmp_path):
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    assert overlays.pip_index_options() == []
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = http://127.0.0.1:1/simple/\nextra-index-url = file:///a file:///b\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_FIND_LINKS", "/wheels")
    assert overlays.pip_index_options() == ["--index-url", "http://127.0.0.1:1/simple/", "--extra-index-url",
                                            "file:///a", "--extra-index-url", "file:///b", "--find-links", "/wheels"]
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:2/simple/")  # the variable beats the file, as in pip
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    options = overlays.pip_index_options()
    assert options[:2] == ["--index-url", "http://127.0.0.1:2/simple/"] and options[-1] == "--no-index"


def test_the_key_follows_the_requirement_set_not_its_order():
    assert overlays.overlay_key(["six==1.15.0", "tabulate"]) == overlays.overlay_key(["tabulate", "six==1.15.0"])
    assert overlays.overlay_key(["six==1.15.0"]) != overlays.overlay_key(["six==1.16.0"])
    assert overlays.interpreter_tag().startswith(f"cp{sys.version_info[0]}{sys.version_info[1]}-")
