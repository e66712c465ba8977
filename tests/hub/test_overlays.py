"""Issue 12: a repo's own requirements. A clear error for a missing module, and per-repo overlays of
wheels that only the repo's worker sees (real installer, real loopback package index, real workers)."""
from __future__ import annotations

import importlib.util
import json
import os
import site
import sys
import warnings

import oneflow as flow
import pytest

from conftest import make_repo
from flowhub import cli, settings
from flowhub.cache import overlay_imports
from flowhub.errors import MissingModuleError, OfflineError, RequirementsInstallError
from flowhub.hub import Hub
from flowhub.worker.host.proxy import Proxy
from wheelhouse import NOT_PRIVATE, flowvision_like, index_env, simple_index  # noqa: F401  (fixtures)


def _site_listing():
    return {p: sorted(os.listdir(p)) for p in site.getsitepackages() if os.path.isdir(p)}


def _published(hub_dir):
    root = hub_dir / "overlays"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def _assert_caller_untouched(before_modules, before_site, names=("six", "tabulate")):
    """None of the overlay's modules is in (or findable through) this process's import system."""
    assert not set(names) & set(sys.modules)
    assert not {m for m in set(sys.modules) - before_modules if m.split(".")[0] in names}
    assert all(importlib.util.find_spec(name) is None for name in names)
    assert _site_listing() == before_site


def _rebuilt_here(model):
    """A real nn.Module of this process (not a proxy)."""
    return isinstance(model, flow.nn.Module) and not isinstance(model, Proxy)


@pytest.mark.parametrize("mode", ["rebuild", "proxy"])
def test_missing_module_error_names_repo_entrypoint_module_and_declared_requirements(gh, hub_root, hub_dir, mode):
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    hub = Hub(mode=mode)
    with pytest.raises(MissingModuleError) as info:
        hub.load("reqs/vision:main", "tiny", trust_repo=True)
    err = info.value
    assert isinstance(err, ModuleNotFoundError) and err.name == "six"  # `except ModuleNotFoundError` still works
    text = str(err)
    assert "reqs/vision@main (commit " in text and "entrypoint 'tiny'" in text and "'six'" in text
    assert "setup.py install_requires: six==1.16.0, tabulate" in text
    assert "hubconf.py dependencies: oneflow" in text
    assert "partly computed" in text  # the computed append is said to be unread, not guessed
    assert "FLOWHUB_INSTALL_REQUIREMENTS=1" in text and "install_requirements=True" in text
    assert "pip install 'six==1.16.0'" in text
    assert "--install-requirements" in text
    assert not (hub_dir / "reqs_vision_main" / "SETUP_PY_RAN").exists()  # setup.py was read, never run
    # listing imports hubconf.py, so it fails the same way, naming the operation
    with pytest.raises(MissingModuleError, match=r"listing its entrypoints"):
        hub.list("reqs/vision:main", trust_repo=True)
    assert "setup.py install_requires: six==1.16.0, tabulate" in hub.last_requirements.describe()


def test_overlay_loads_the_repo_and_leaves_the_caller_untouched(gh, hub_root, hub_dir, index_env):
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    before_modules, before_site = set(sys.modules), _site_listing()
    hub = Hub(install_requirements=True)  # mode="rebuild", the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no switch to proxy mode, no warning
        model = hub.load("reqs/vision:main", "tiny", trust_repo=True)
    assert _rebuilt_here(model) and type(model).__name__ == "Tiny"
    versions = model.versions()
    assert versions["six"] == "1.16.0" and versions["tabulate"] == "0.9.0"  # tabulate's relative import too
    assert versions["six_file"].startswith(str(hub_dir / "overlays"))
    assert "layer" in model.table()
    out = model(flow.ones(1, 2))
    assert tuple(out.shape) == (1, 2) and isinstance(out, flow.Tensor)
    # the model's modules see the overlay's packages, privately: its own set, one per overlay
    (key,) = _published(hub_dir)
    importer = overlay_imports.for_site(str(hub_dir / "overlays" / key / "site"))
    assert importer.names == {"six", "tabulate"} and importer.modules["six"] is model.versions.__globals__["six"]
    # the caller's environment is as it was
    _assert_caller_untouched(before_modules, before_site)
    # one overlay, published whole, with its manifest; nothing left in staging
    (key,) = _published(hub_dir)
    manifest = json.loads((hub_dir / "overlays" / key / "overlay.json").read_text())
    assert manifest["requirements"] == ["six==1.16.0", "tabulate"]
    assert sorted(manifest["installed"]) == ["six==1.16.0", "tabulate==0.9.0"]
    uv_here = any(os.access(p, os.X_OK) for p in settings.uv_candidates())  # scripts/ensure_env.sh provides it
    assert manifest["installer"] == ("uv" if uv_here else "pip")
    assert manifest["index"] == ["--index-url", index_env["url"]]  # pip's configured index, which uv was given
    assert not list((hub_dir / "overlays" / ".flowhub" / "tmp").iterdir())
    # list and help see the overlay too
    assert "tiny" in hub.list("reqs/vision:main", trust_repo=True)
    assert "six and tabulate" in hub.help("reqs/vision:main", "tiny", trust_repo=True)


@pytest.mark.parametrize("mode", ["rebuild", "proxy"])
def test_two_repos_needing_two_versions_of_one_package_load_side_by_side(gh, hub_root, hub_dir, index_env, mode):
    make_repo(hub_root, "reqs", "new", flowvision_like("six==1.16.0"))
    make_repo(hub_root, "reqs", "old", flowvision_like("six==1.15.0"))
    before_modules, before_site = set(sys.modules), _site_listing()
    hub = Hub(install_requirements=True, mode=mode)
    new = hub.load("reqs/new:main", "tiny", trust_repo=True)
    old = hub.load("reqs/old:main", "tiny", trust_repo=True)
    assert _rebuilt_here(new) == _rebuilt_here(old) == (mode == "rebuild")
    assert new.versions()["six"] == "1.16.0" and old.versions()["six"] == "1.15.0"
    assert new.versions()["six"] == "1.16.0"  # both stay usable in this one process
    assert new.versions()["six_file"] != old.versions()["six_file"]
    assert tuple(new(flow.ones(1, 2)).shape) == tuple(old(flow.ones(1, 2)).shape) == (1, 2)
    if mode == "rebuild":  # distinct module objects side by side; one model class per repo
        assert new.versions.__globals__["six"] is not old.versions.__globals__["six"]
        assert type(new) is not type(old)
        again = hub.load("reqs/new:main", "tiny", trust_repo=True)  # one overlay: one private module set
        assert again.versions.__globals__["six"] is new.versions.__globals__["six"]
    assert len(_published(hub_dir)) == 2
    _assert_caller_untouched(before_modules, before_site)


def test_a_rebuilt_model_uses_overlay_classes_and_imports_them_at_call_time(gh, hub_root, hub_dir, index_env):
    make_repo(hub_root, "reqs", "fancy", flowvision_like("six==1.15.0", fancy=True))
    before_modules, before_site = set(sys.modules), _site_listing()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = Hub(install_requirements=True).load("reqs/fancy:main", "fancy", trust_repo=True)
    assert _rebuilt_here(model) and type(model).__name__ == "Fancy"
    tabulate = model.report.__globals__["tabulate"]
    assert tabulate.__file__.startswith(str(hub_dir / "overlays"))
    # the repo's class subclasses the overlay's class, and the model holds the overlay's objects
    assert type(model.caption).__mro__[1] is tabulate.JupyterHTMLStr and model.caption._repr_html_() == "<b>fancy</b>"
    assert type(model.fmt) is tabulate.TableFormat
    # the forward's `import six` runs now, in this process, and finds the overlay's six
    out = model(flow.ones(1, 2))
    assert flow.allclose(out, model.fc(flow.ones(1, 2)) * 2)
    report = model.report()
    assert report["subclass"] and report["six"] == "1.15.0" and report["six_file"].startswith(str(hub_dir / "overlays"))
    assert report["table"] == "fc|2"
    # a second model of the same overlay shares the overlay's classes with the first
    other = Hub(install_requirements=True).load("reqs/fancy:main", "fancy", trust_repo=True)
    assert type(other.fmt) is type(model.fmt) and type(other.caption).__mro__[1] is tabulate.JupyterHTMLStr
    _assert_caller_untouched(before_modules, before_site)


@pytest.mark.parametrize("package", ["lazytop", "lazysub"])
def test_an_overlay_module_that_cannot_be_imported_privately_loads_in_proxy_mode(gh, hub_root, hub_dir, index_env,
                                                                                package):
    """``lazytop`` fails when the overlay's packages are imported privately before the load;
    ``lazysub`` only when the result's module needs ``lazysub.lazy``: the load then runs again."""
    assert package in NOT_PRIVATE
    make_repo(hub_root, "reqs", package, flowvision_like(extra=package))
    before_modules, before_site = set(sys.modules), _site_listing()
    hub = Hub(install_requirements=True)
    if package == "lazytop":
        expected = (r"lazytop \(from the overlay .*\) cannot be imported privately in this process \(ImportError: "
                    r"importing it registered lazytop in sys.modules.*so it loads in proxy mode")
    else:
        expected = (r"could not be rebuilt in this process: lazysub.lazy \(from the overlay .*\) cannot be imported "
                    r"privately in this process \(ModuleNotFoundError: No module named 'lazysub'\)\. "
                    r"It was loaded again in proxy mode")
    with pytest.warns(UserWarning, match=expected) as record:
        model = hub.load(f"reqs/{package}:main", "lazy", trust_repo=True)
    assert len([w for w in record if "proxy mode" in str(w.message)]) == 1
    assert isinstance(model, Proxy)
    assert model.answer() == 42  # it works in the worker, as an ordinary import
    assert tuple(model(flow.ones(1, 2)).shape) == (1, 2)
    _assert_caller_untouched(before_modules, before_site, names=("six", "tabulate", package))
    # a model of the same repo that needs no such module is still rebuilt here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = hub.load(f"reqs/{package}:main", "tiny", trust_repo=True)
    assert _rebuilt_here(tiny) == (package == "lazysub")


def test_offline_reuses_an_existing_overlay_and_says_clearly_when_there_is_none(gh, hub_root, hub_dir, index_env,
                                                                                 monkeypatch):
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    assert Hub(install_requirements=True, mode="proxy").load("reqs/vision:main", "tiny", trust_repo=True) is not None
    (key,) = _published(hub_dir)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # no index any more: nothing may install
    monkeypatch.setenv("FLOWHUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWHUB_INSTALL_REQUIREMENTS", "1")
    model = Hub(mode="proxy").load("reqs/vision:main", "tiny")
    assert model.versions()["six"] == "1.16.0"
    assert _published(hub_dir) == [key]
    for name in _published(hub_dir):
        import shutil

        shutil.rmtree(hub_dir / "overlays" / name)
    with pytest.raises(OfflineError, match=r"needs six==1.16.0, tabulate.*no overlay"):
        Hub(mode="proxy").load("reqs/vision:main", "tiny")


def test_a_requirement_without_a_wheel_fails_clearly_and_installs_nothing(gh, hub_root, hub_dir, index_env):
    make_repo(hub_root, "reqs", "sdist", flowvision_like(extra="nowheel-pkg"))
    with pytest.raises(RequirementsInstallError) as info:
        Hub(install_requirements=True, mode="proxy").load("reqs/sdist:main", "tiny", trust_repo=True)
    text = str(info.value)
    assert "nowheel-pkg" in text and "as wheels" in text and "nothing was installed" in text
    assert _published(hub_dir) == []
    assert not list((hub_dir / "overlays" / ".flowhub" / "tmp").iterdir())
    assert not index_env["marker"].exists()  # the sdist's setup.py never ran


def test_pip_installs_the_overlay_where_uv_is_not_used(gh, hub_root, hub_dir, index_env, monkeypatch):
    monkeypatch.setenv("FLOWHUB_INSTALLER", "pip")
    make_repo(hub_root, "reqs", "vision", flowvision_like("six==1.15.0"))
    model = Hub(install_requirements=True, mode="proxy").load("reqs/vision:main", "tiny", trust_repo=True)
    assert model.versions()["six"] == "1.15.0"
    (key,) = _published(hub_dir)
    assert json.loads((hub_dir / "overlays" / key / "overlay.json").read_text())["installer"] == "pip"


def test_inprocess_mode_refuses_a_repo_that_needs_an_overlay(gh, hub_root, index_env):
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    with pytest.raises(RequirementsInstallError, match='mode="inprocess"'):
        Hub(install_requirements=True, mode="inprocess").load("reqs/vision:main", "tiny", trust_repo=True)
    assert "six" not in sys.modules


def test_cache_ls_and_prune_show_and_remove_overlays(gh, hub_root, hub_dir, index_env, capsys):
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Hub(install_requirements=True).load("reqs/vision:main", "tiny", trust_repo=True)
    (key,) = _published(hub_dir)
    capsys.readouterr()
    assert cli.main(["cache", "ls", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    (overlay,) = [e for e in entries if e["kind"] == "overlay"]
    assert overlay["name"] == f"overlays/{key}" and "six==1.16.0" in overlay["source"] and overlay["size"] > 0
    assert not [e for e in entries if e["kind"] == "repo" and e["name"] == "overlays"]
    assert cli.main(["cache", "verify"]) == 0
    assert cli.main(["cache", "prune", "--max-size", "1"]) == 0
    assert f"removed overlay overlays/{key}" in capsys.readouterr().out
    assert _published(hub_dir) == []


def test_cli_flag_installs_requirements_and_list_shows_the_declared_ones(gh, hub_root, index_env, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")  # `-q` below sets it in this process: undone after the test
    make_repo(hub_root, "reqs", "vision", flowvision_like())
    assert cli.main(["list", "reqs/vision:main", "--trust"]) == 1
    assert "FLOWHUB_INSTALL_REQUIREMENTS=1" in capsys.readouterr().err
    assert cli.main(["list", "reqs/vision:main", "--trust", "--install-requirements"]) == 0
    out = capsys.readouterr()
    assert out.out.split() == ["Tiny", "tiny"]
    assert "setup.py install_requires: six==1.16.0, tabulate" in out.err
    assert cli.main(["help", "reqs/vision:main", "tiny", "--install-requirements"]) == 0
    assert "hubconf.py dependencies: oneflow" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["load", "reqs/vision:main", "tiny", "--install-requirements", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Tiny: 6 parameters in 2 tensors" in out and "proxy" not in out  # rebuilt here


def test_a_sandboxed_load_gets_its_overlay_installed_by_the_caller(gh, hub_root, hub_dir, index_env):
    make_repo(hub_root, "reqs", "vision", flowvision_like("six==1.15.0"))
    model = Hub(install_requirements=True, sandbox=True).load("reqs/vision:main", "tiny")
    versions = model.versions()
    assert versions["six"] == "1.15.0" and versions["six_file"].startswith(str(hub_dir / "overlays"))
    assert "six" not in sys.modules
