"""Shared fixtures: the example hub served by the real loopback server, and an isolated hub folder per test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import build_hub  # noqa: E402

import flowhub  # noqa: E402
import flowhub.api  # noqa: E402
import flowhub.settings  # noqa: E402
from flowhub.server import GitHubServer  # noqa: E402

_FLOWHUB_ENV = ("FLOWHUB_GITHUB_URL", "FLOWHUB_GITHUB_API_URL", "FLOWHUB_OFFLINE", "FLOWHUB_TIMEOUT",
                "FLOWHUB_RETRIES", "FLOWHUB_LOCK_TIMEOUT", "FLOWHUB_MODE", "FLOWHUB_WORKER_TIMEOUT",
                "FLOWHUB_SANDBOX", "GITHUB_TOKEN", "ONEFLOW_HOME", "XDG_CACHE_HOME", "ONEFLOW_HUB",
                "ONEFLOW_MODEL_ZOO")


@pytest.fixture(scope="session", autouse=True)
def zygote_services():
    """The tests' zygote services live in a runtime folder of their own (short: a socket path has at
    most 107 bytes) and are shut down when the session ends; processes the tests start share them."""
    import tempfile

    from flowhub.worker.host.service import stop_services

    folder = tempfile.mkdtemp(prefix="fh-rt-")
    saved = {k: os.environ.get(k) for k in ("FLOWHUB_RUNTIME_DIR", "FLOWHUB_ZYGOTE", "FLOWHUB_ZYGOTE_IDLE_TIMEOUT")}
    os.environ.update(FLOWHUB_RUNTIME_DIR=folder, FLOWHUB_ZYGOTE_IDLE_TIMEOUT="120")
    os.environ.pop("FLOWHUB_ZYGOTE", None)
    yield folder
    from flowhub.worker.host import pool

    pool.get_manager().shutdown()
    stop_services(folder)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _built_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("github")
    return root, build_hub.build(root)


@pytest.fixture(scope="session")
def hub_root(_built_hub) -> Path:
    """A folder of git repositories and release files: the bundled example hub (served by ``server``)."""
    return _built_hub[0]


@pytest.fixture(scope="session")
def example(_built_hub) -> Dict[str, object]:
    """Owner, repo, tag SHAs and weight file names of the example hub."""
    return _built_hub[1]


@pytest.fixture(scope="session")
def server(hub_root):
    srv = GitHubServer(hub_root)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No flowhub/oneflow variables leak in from the machine; every test gets its own ONEFLOW_HOME."""
    for name in _FLOWHUB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ONEFLOW_HOME", str(tmp_path / "oneflow_home"))
    monkeypatch.setenv("FLOWHUB_TIMEOUT", "5")
    flowhub.api._default_hub = None
    flowhub.settings.set_process_hub_dir(None)
    yield
    flowhub.api._default_hub = None
    flowhub.settings.set_process_hub_dir(None)


@pytest.fixture
def gh(server, monkeypatch, request):
    """Point flowhub at the loopback server; faults and the request log start empty."""
    monkeypatch.setenv("FLOWHUB_GITHUB_URL", server.url)
    monkeypatch.setenv("FLOWHUB_GITHUB_API_URL", server.api_url)
    server.clear_faults()
    server.clear_log()
    yield server
    server.clear_faults()


@pytest.fixture
def hub_dir(tmp_path) -> Path:
    return tmp_path / "oneflow_home" / "hub"


def make_repo(root: Path, owner: str, name: str, files: Dict[str, str], *, branch: str = "main",
              tags: Optional[Dict[str, Dict[str, str]]] = None,
              branches: Optional[Dict[str, Dict[str, str]]] = None) -> Dict[str, str]:
    """Create ``root/owner/name.git`` with ``files`` on ``branch``; each extra branch/tag commits its own
    files on top of that first commit. Returns ref name -> commit SHA."""
    import tempfile

    shas: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / name
        work.mkdir()
        build_hub.git(work, "init", "-q", "-b", branch)

        def commit(content: Dict[str, str], message: str) -> str:
            for rel, text in content.items():
                path = work / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            build_hub.git(work, "add", "-A")
            build_hub.git(work, "commit", "-q", "--allow-empty", "-m", message)
            return build_hub.git(work, "rev-parse", "HEAD")

        shas[branch] = base = commit(files, "initial")
        for kind, refs in (("branch", branches or {}), ("tag", tags or {})):
            for ref, content in refs.items():
                build_hub.git(work, "checkout", "-q", "-b", f"tmp-{kind}-{ref}", base)
                shas[ref] = commit(content, f"{kind} {ref}")
                if kind == "branch":
                    build_hub.git(work, "branch", "-q", ref)
                else:
                    build_hub.git(work, "tag", ref)
                build_hub.git(work, "checkout", "-q", branch)
                build_hub.git(work, "branch", "-q", "-D", f"tmp-{kind}-{ref}")
        bare = root / owner / f"{name}.git"
        if bare.exists():
            import shutil

            shutil.rmtree(bare)
        bare.parent.mkdir(parents=True, exist_ok=True)
        build_hub.git(root, "clone", "-q", "--bare", str(work), str(bare))
    return shas


def run_python(code: str, env: Optional[Dict[str, str]] = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment, with the current environment plus ``env``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def publish_checkpoint(hub_root: Path, owner: str, repo: str, state: dict, work: Path, name: str = "net") -> str:
    """Save ``state`` as a oneflow checkpoint folder and serve it zipped as the release asset
    ``/{owner}/{repo}/releases/download/v1/{name}.zip`` of the loopback server; returns that path."""
    import zipfile

    import oneflow as flow

    folder = work / "saved" / name
    flow.save(state, str(folder))
    assets = hub_root / owner / repo / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(assets / f"{name}.zip", "w") as z:
        for root, _, files in os.walk(folder):
            for file in files:
                full = os.path.join(root, file)
                z.write(full, os.path.relpath(full, folder.parent))
    return f"/{owner}/{repo}/releases/download/v1/{name}.zip"


def push_commit(root: Path, owner: str, name: str, files: Dict[str, str], branch: str = "main") -> str:
    """Add a commit with ``files`` on top of ``branch`` of ``root/owner/name.git`` (the branch moves); return its SHA."""
    import tempfile

    bare = root / owner / f"{name}.git"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / name
        build_hub.git(Path(tmp), "clone", "-q", "-b", branch, str(bare), str(work))
        for rel, text in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        build_hub.git(work, "add", "-A")
        build_hub.git(work, "commit", "-q", "-m", "move the branch")
        build_hub.git(work, "push", "-q", "origin", branch)
        return build_hub.git(work, "rev-parse", "HEAD")


def expected_state_dict(hub_root, example, tag, name, tmp_path):
    """The release's weights, read straight from the server's folder (not through flowhub)."""
    asset = hub_root / "flowhub-examples" / "tiny-models" / "releases" / "download" / tag / example["weights"][tag][name]
    import zipfile

    import oneflow as flow

    with zipfile.ZipFile(asset) as zf:
        zf.extractall(tmp_path / "expected")
    return flow.load(str(tmp_path / "expected" / name))
