"""Issue #9, items 3, 12, 13 and 14: what the caller fetches and caches for weights, against crafted input.

Real processes, real sockets, loopback only, no mocks: the weights come from the loopback GitHub server
(with its fault injection for redirects, HTML pages and dropped connections), and a second TCP
listener owned by the test stands for an internal service that no fetch may reach.

- item 3: a sandboxed hubconf's fetches (made by the caller) cannot leave the host allow-list through
  URLs that ``urllib.parse`` and ``requests`` read differently, credentials, another port of an allowed
  host, or a redirect; allowed redirects keep working, resumes included;
- item 12: ``file_name`` (and ``flowhub download --file-name``) cannot write outside the cache;
- item 13: an HTML page, a truncated zip or an unknown file served as a checkpoint is refused with what
  was received and nothing is cached; single-file checkpoints are cached but never handed to
  ``oneflow.load`` (which would ``torch.load``, i.e. unpickle, them) in the caller: flowhub's allow-list
  readers read them;
- item 14: clear errors for bad timeouts, an empty ``hub_dir`` and non-http(s) URLs.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import List, Tuple

import numpy as np
import oneflow as flow
import pytest

import flowhub
import flowhub.errors
from flowhub.server import Fault

REPO = "flowhub-examples/tiny-models"
FLOWHUB = os.path.join(os.path.dirname(sys.executable), "flowhub")

FETCH_HUBCONF = r'''
import os
import oneflow.hub


def fetch(urls):
    """For each URL: the keys of the state dict loaded from it, or the exception it raised."""
    out = []
    for url in urls:
        try:
            out.append("ok: " + ",".join(sorted(oneflow.hub.load_state_dict_from_url(url, progress=False))))
        except Exception as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


def download(url):
    try:
        oneflow.hub.download_url_to_file(url, os.path.join(os.getcwd(), "downloaded"), progress=False)
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
'''


# -- helpers ------------------------------------------------------------------------------------------
class Listener:
    """A TCP listener on 127.0.0.1 (an "internal service") that records every connection it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.connections: List[Tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, address = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections.append(address)
            conn.close()  # fail fast: the test only needs to know that someone connected

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def victim():
    listener = Listener()
    yield listener
    listener.close()


@pytest.fixture
def files(hub_root, request) -> Tuple[Path, str]:
    """A folder under the server root for this test only: (path, URL path prefix)."""
    name = "fetch-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:90]
    folder = hub_root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    yield folder, f"/{name}"
    shutil.rmtree(folder, ignore_errors=True)


def asset_path(example, name: str = "tinymlp") -> str:
    return f"/{REPO}/releases/download/v0.1/{example['weights']['v0.1'][name]}"


def asset_file(hub_root: Path, example, name: str = "tinymlp") -> Path:
    return hub_root / asset_path(example, name).lstrip("/")


def redirect(gh, path: str, location: str) -> Fault:
    """Make ``path`` on the loopback server answer 302 to ``location`` (every time)."""
    return gh.add_fault(Fault(path, "status", times=None, status=302, headers={"Location": location}))


def tree(root: Path) -> set:
    return {str(p) for p in root.rglob("*")}


def cached_files(model_dir: Path) -> List[str]:
    if not model_dir.exists():
        return []
    return sorted(p.name for p in model_dir.iterdir() if p.name != ".flowhub")


def leftovers(root: Path) -> List[str]:
    found = [str(p) for p in root.rglob("*.partial")]
    for tmp in root.rglob(".flowhub/tmp"):
        found += [str(p) for p in tmp.iterdir()]
    return found


def format_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "CheckpointFormatError" and isinstance(exc, flowhub.errors.IntegrityError)


def zipped_checkpoint(state, folder: Path, inner: str = "net") -> bytes:
    flow.save(state, str(folder / inner))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted((folder / inner).rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def safetensors_bytes() -> bytes:
    data = np.arange(6, dtype=np.float32).tobytes()
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, len(data)]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


class _Marker:
    """Unpickling this creates ``path``: proof that someone ran the checkpoint's pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def torch_legacy_bytes(marker: str) -> bytes:
    """A legacy ``torch.save`` file (its magic number first) whose pickle would create ``marker``."""
    return pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2) + \
        pickle.dumps(_Marker(marker), protocol=2)


# -- item 3: the caller's fetches on a sandboxed worker's behalf -------------------------------------------
def test_sandboxed_fetches_cannot_leave_the_allow_list(gh, hub_root, example, tmp_path, monkeypatch, victim):
    repo = tmp_path / "fetcher"
    repo.mkdir()
    (repo / "hubconf.py").write_text(FETCH_HUBCONF)
    v, g = victim.port, gh.port
    # bare host names allowed besides the endpoint: the old check let their spellings and ports through
    monkeypatch.setenv("FLOWHUB_SANDBOX_ALLOWED_HOSTS", "localhost, github.com")
    redirect(gh, "/moved/away.zip", f"http://127.0.0.1:{v}/x.zip")
    redirect(gh, "/moved/tricky.zip", f"http://127.0.0.1:{v}\\@localhost/x.zip")
    redirect(gh, "/moved/home.zip", f"{gh.url}{asset_path(example)}")
    crafted = [
        f"http://127.0.0.1:{v}\\@localhost/x.zip",    # urlsplit: localhost; requests: 127.0.0.1:{v}
        f"http://127.0.0.1:{v}\\@github.com/x.zip",
        f"http://127.0.0.1:{v}\\@127.0.0.1:{g}/x.zip",
        f"http://localhost@127.0.0.1:{v}/x.zip",      # credentials
        f"http://localhost:{v}/x.zip",                # an allowed host, another port
        f"{gh.url}/moved/away.zip",                   # allowed host, redirect to the listener
        f"{gh.url}/moved/tricky.zip",
    ]
    hub = flowhub.Hub(sandbox=True, mode="proxy")
    results = hub.load(str(repo), "fetch", crafted + [f"{gh.url}/moved/home.zip"], source="local")
    assert victim.connections == []
    for url, result in zip(crafted, results):
        assert result.startswith("PermissionError: "), (url, result)
        assert "FLOWHUB_SANDBOX_ALLOWED_HOSTS" in result, result
    assert "redirected to" in results[5] and f"127.0.0.1:{v}" in results[5]
    assert "backslash" in results[0] and "credentials" in results[3] and f"localhost:{v}" in results[4]
    # a redirect inside the allow-list still works
    assert results[-1] == "ok: fc1.bias,fc1.weight,fc2.bias,fc2.weight"
    # download_url_to_file goes through the same client
    refused = hub.load(str(repo), "download", f"{gh.url}/moved/away.zip", source="local")
    assert refused.startswith("PermissionError: ") and "redirected to" in refused
    assert victim.connections == []
    assert not [r for r in gh.requests if r.path.endswith("/x.zip")]


def test_redirects_keep_resuming_with_range(gh, hub_root, example, tmp_path):
    """Not sandboxed: a redirect to the same server is followed, and a dropped body resumes with a
    ``Range`` request that reaches the redirect's target."""
    target = asset_path(example)
    size = asset_file(hub_root, example).stat().st_size
    redirect(gh, "/moved/resumed.zip", f"{gh.url}{target}")
    gh.add_fault(Fault(target, "drop", times=1, after_bytes=size // 2))
    state = flowhub.load_state_dict_from_url(f"{gh.url}/moved/resumed.zip", progress=False)
    assert sorted(state) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    log = [(r.path, r.range, r.status) for r in gh.requests]
    assert log == [("/moved/resumed.zip", None, 302), (target, None, 200),
                   ("/moved/resumed.zip", f"bytes={size // 2}-", 302), (target, f"bytes={size // 2}-", 206)]


def test_redirect_to_another_scheme_is_refused(gh, tmp_path):
    redirect(gh, "/moved/local.zip", "file:///etc/passwd")
    with pytest.raises(ValueError, match=r"redirected to 'file:///etc/passwd'.*http\(s\)"):
        flowhub.download_url_to_file(f"{gh.url}/moved/local.zip", str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_redirect_loop_is_a_network_error(gh, tmp_path):
    redirect(gh, "/moved/loop.zip", f"{gh.url}/moved/loop.zip")
    with pytest.raises(flowhub.errors.NetworkError, match="more than 30 redirects"):
        flowhub.download_url_to_file(f"{gh.url}/moved/loop.zip", str(tmp_path / "out"), progress=False)
    assert gh.count("/moved/loop.zip") == 31 and not (tmp_path / "out").exists()


# -- item 12: file_name stays inside the cache -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "subfolder", "backslash", "parent"])
def test_file_name_cannot_write_outside_the_cache(gh, example, hub_dir, tmp_path, kind):
    name = {"dotdot": "../../escaped.zip", "absolute": str(tmp_path / "escaped.zip"),
            "subfolder": "sub/escaped.zip", "backslash": "..\\escaped.zip", "parent": ".."}[kind]
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="is not a plain file name") as info:
        flowhub.load_state_dict_from_url(f"{gh.url}{asset_path(example)}", file_name=name, progress=False)
    assert "model_dir" in str(info.value)
    assert tree(tmp_path) - before == set()
    assert gh.requests == []


def test_cli_file_name_cannot_write_outside_the_cache(gh, example, hub_dir, tmp_path):
    before = tree(tmp_path)
    for name in ("../../escaped.zip", str(tmp_path / "escaped.zip")):
        proc = subprocess.run([FLOWHUB, "download", f"{gh.url}{asset_path(example)}", "--file-name", name, "-q"],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and "not a plain file name" in proc.stderr, proc.stderr
    assert tree(tmp_path) - before == set()
    assert gh.requests == []


# -- item 13: only checkpoints are cached, and no single file reaches oneflow.load here ----------------------
def test_html_page_is_refused_and_nothing_is_cached(gh, example, hub_dir, tmp_path):
    url = f"{gh.url}{asset_path(example)}"
    gh.add_fault(Fault(asset_path(example), "html"))
    with pytest.raises(Exception) as info:
        flowhub.load_state_dict_from_url(url, progress=False)
    assert format_error(info.value), repr(info.value)
    message = str(info.value)
    assert url in message and "text/html" in message and "<!DOCTYPE html>" in message and "HTML page" in message
    assert "Nothing was cached" in message
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []
    gh.clear_log()
    assert sorted(flowhub.load_state_dict_from_url(url, progress=False)) == ["fc1.bias", "fc1.weight", "fc2.bias",
                                                                            "fc2.weight"]
    assert gh.count(asset_path(example)) == 1  # the next call downloaded it again


def test_truncated_zip_is_refused_then_downloaded_again(files, gh, hub_dir, tmp_path):
    folder, prefix = files
    state = {"w": flow.ones(2, 3)}
    whole = zipped_checkpoint(state, tmp_path)
    (folder / "w.zip").write_bytes(whole[: len(whole) // 2])  # served complete, with its own length
    url = f"{gh.url}{prefix}/w.zip"
    with pytest.raises(Exception) as info:
        flowhub.load_state_dict_from_url(url, progress=False)
    assert format_error(info.value), repr(info.value)
    assert "truncated or corrupt zip" in str(info.value) and url in str(info.value)
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []
    (folder / "w.zip").write_bytes(whole)
    assert flow.equal(flowhub.load_state_dict_from_url(url, progress=False)["w"], state["w"])


@pytest.mark.parametrize("kind", ["zip-without-checkpoint", "text", "empty"])
def test_unknown_files_are_refused(files, gh, hub_dir, kind):
    folder, prefix = files
    if kind == "zip-without-checkpoint":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("model/README.txt", "not weights")
        data = buf.getvalue()
    else:
        data = b"" if kind == "empty" else b"Access denied\n"
    (folder / "w.bin").write_bytes(data)
    with pytest.raises(Exception) as info:
        flowhub.load_state_dict_from_url(f"{gh.url}{prefix}/w.bin", progress=False)
    assert format_error(info.value), repr(info.value)
    assert f"{len(data)} bytes" in str(info.value)
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []


def test_garbage_cached_earlier_is_downloaded_again(gh, example, hub_dir):
    """A page cached by an older flowhub (or by the reference) is replaced instead of failing forever."""
    url = f"{gh.url}{asset_path(example)}"
    cached = hub_dir / "checkpoints" / example["weights"]["v0.1"]["tinymlp"]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n")
    assert sorted(flowhub.load_state_dict_from_url(url, progress=False)) == ["fc1.bias", "fc1.weight", "fc2.bias",
                                                                            "fc2.weight"]
    assert gh.count(asset_path(example)) == 1


@pytest.mark.parametrize("kind", ["torch-legacy", "safetensors"])
def test_single_file_checkpoints_are_cached_but_not_unpickled_here(files, gh, hub_dir, tmp_path, kind):
    folder, prefix = files
    marker = tmp_path / "pickle-ran"
    name = "w.pth" if kind == "torch-legacy" else "w.safetensors"
    (folder / name).write_bytes(torch_legacy_bytes(str(marker)) if kind == "torch-legacy" else safetensors_bytes())
    url = f"{gh.url}{prefix}/{name}"
    # a known format: the download is accepted and cached ...
    proc = subprocess.run([FLOWHUB, "download", url, "-q"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert cached_files(hub_dir / "checkpoints") == [name]
    # ... and read by flowhub's own readers, never by an unpickler that runs code (oneflow.load would
    # give the file to torch.load): safetensors loads, a pickle naming anything but tensors is refused
    if kind == "safetensors":
        assert flowhub.load_state_dict_from_url(url, progress=False)["w"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    else:
        for load in (lambda: flowhub.load_state_dict_from_url(url, progress=False),
                     lambda: flowhub.load_weights(hub_dir / "checkpoints" / name, weights_only=False)):
            with pytest.raises(flowhub.errors.UnsafeCheckpointError,
                               match=r"asks for io\.open.*Nothing from the file was run"):
                load()
    assert not marker.exists()
    assert gh.count(f"{prefix}/{name}") == 1  # cached: no second download


# -- item 14: clear errors for bad settings and URLs -------------------------------------------------------
@pytest.mark.parametrize("kwargs, pattern", [
    ({"timeout": -1}, r"timeout=-1 is not a positive number of seconds.*FLOWHUB_TIMEOUT"),
    ({"timeout": 0}, r"timeout=0 is not a positive number"),
    ({"timeout": float("nan")}, r"timeout=nan is not a positive number"),
    ({"timeout": "soon"}, r"timeout='soon' is not a positive number"),
    ({"lock_timeout": -5}, r"lock_timeout=-5 .*FLOWHUB_LOCK_TIMEOUT"),
    ({"worker_timeout": 0}, r"worker_timeout=0 .*FLOWHUB_WORKER_TIMEOUT"),
    ({"retries": -1}, r"retries=-1 is not a whole number"),
    ({"hub_dir": ""}, r"hub_dir='' is not a folder"),
    ({"hub_dir": "  "}, r"hub_dir='  ' is not a folder"),
])
def test_bad_hub_arguments_are_clear_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        flowhub.Hub(**kwargs)


def test_set_dir_to_nothing_is_a_clear_error(hub_dir):
    with pytest.raises(ValueError, match="hub_dir='' is not a folder"):
        flowhub.set_dir("")
    assert flowhub.get_dir() == str(hub_dir)  # unchanged


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/w.zip", "/etc/passwd", "http:/no-host"])
def test_non_http_urls_are_clear_errors(url, tmp_path, hub_dir):
    dst = tmp_path / "out"
    with pytest.raises(ValueError, match=r"http\(s\)|names no host"):
        flowhub.download_url_to_file(url, str(dst), progress=False)
    with pytest.raises(ValueError, match=r"http\(s\)|names no host"):
        flowhub.load_state_dict_from_url(url, file_name="w.zip", progress=False)
    assert not dst.exists() and leftovers(tmp_path) == []
    assert cached_files(hub_dir / "checkpoints") == []
