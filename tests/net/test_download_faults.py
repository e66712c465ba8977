"""Downloads and cache entries under failure: the real loopback server with injected faults, real files,
real processes (SIGKILL included), no mocks.

Each test asserts an outcome that a plausible bug would change: the bytes and SHA-256 of what was
published, the requests the server actually saw (Range headers, statuses, counts), and what is or is
not left in the cache afterwards.
"""
from __future__ import annotations

import glob
import hashlib
import http.server
import io
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import oneflow as flow
import pytest

import flowhub
import flowhub.net.download
from flowhub.cache import inventory
from conftest import run_python
from flowhub.errors import (ArchiveError, HashMismatchError, IncompleteDownloadError, NetworkError,
                            RequestTimeoutError)
from flowhub.server import Fault
from flowhub.server.static import etag_for

REPO = "flowhub-examples/tiny-models"
MiB = 1 << 20


# -- helpers ----------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path) -> str:
    with open(path, "rb") as f:
        return sha256_bytes(f.read())


def leftovers(root: Path) -> List[str]:
    """Temp files and staging folders under ``root`` (what a clean failure or success must not leave)."""
    found = [str(p) for p in root.rglob("*.partial")]
    for tmp in root.rglob(".flowhub/tmp"):
        found += [str(p) for p in tmp.iterdir()]
    return sorted(found)


def cached_files(model_dir: Path) -> List[str]:
    """What ``<model_dir>`` holds besides flowhub's own records (i.e. what looks like a cached file)."""
    if not model_dir.exists():
        return []
    return sorted(p.name for p in model_dir.iterdir() if p.name != ".flowhub")


def weights_url(gh, example, tag: str = "v0.1", name: str = "tinynet") -> str:
    return f"{gh.url}/{REPO}/releases/download/{tag}/{example['weights'][tag][name]}"


def weights_asset(hub_root: Path, example, tag: str = "v0.1", name: str = "tinynet") -> Path:
    return hub_root / "flowhub-examples" / "tiny-models" / "releases" / "download" / tag / example["weights"][tag][name]


def expected_state_dict(asset: Path, tmp_path: Path, inner: Optional[str] = None) -> Dict[str, flow.Tensor]:
    """The checkpoint in ``asset``, read straight from the server's copy (not through flowhub)."""
    out = tmp_path / f"expected-{asset.name}"
    with zipfile.ZipFile(asset) as zf:
        zf.extractall(out)
        inner = inner or zf.namelist()[0].split("/")[0]
    return flow.load(str(out / inner))


def assert_same_state(got: Dict[str, flow.Tensor], want: Dict[str, flow.Tensor]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert flow.equal(got[key], value), key


def state_digest(state: Dict[str, flow.Tensor]) -> str:
    sha = hashlib.sha256()
    for key in sorted(state):
        sha.update(key.encode())
        sha.update(state[key].numpy().tobytes())
    return sha.hexdigest()


def zip_checkpoint(state: Dict[str, flow.Tensor], inner: str, dest: Path, tmp: Path, *,
                   dir_entries: bool = True, first: Optional[str] = None) -> Path:
    """``flow.save(state)`` as folder ``inner`` and zip it to ``dest``.

    ``dir_entries=False`` writes files only (what ``zip -D`` produces); ``first`` puts the member whose
    name ends with it first, so the folder is *not* the first member.
    """
    folder = tmp / f"save-{dest.stem}" / inner
    flow.save(state, str(folder))
    members: List[Tuple[str, Optional[Path]]] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        rel = Path(root).relative_to(folder.parent).as_posix()
        if dir_entries:
            members.append((rel + "/", None))
        members += [(f"{rel}/{n}", Path(root) / n) for n in sorted(names)]
    if first is not None:
        members.sort(key=lambda m: not m[0].endswith(first))
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for name, path in members:
            zf.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), b"" if path is None else path.read_bytes())
    return dest


@pytest.fixture
def files(hub_root, request) -> Tuple[Path, str]:
    """A folder under the server root for this test only: (path, URL path prefix)."""
    name = "faults-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:90]
    folder = hub_root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    yield folder, f"/{name}"
    shutil.rmtree(folder, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (rc={proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def popen_python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def kill_python_when(code: str, predicate, what: str):
    """Run ``code`` in a new interpreter, SIGKILL it as soon as ``predicate()`` holds; return that value."""
    proc = popen_python(code)
    try:
        value = wait_for(predicate, 60, what, proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        return value
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- dropped connections and resume -----------------------------------------------------------------
@pytest.mark.parametrize("size", [300_001, 3 * MiB + 12_345], ids=["under-one-chunk", "several-chunks"])
def test_dropped_connection_resumes_with_range(gh, files, tmp_path, size):
    folder, prefix = files
    data = os.urandom(size)
    (folder / "blob.bin").write_bytes(data)
    cut = size // 2 + 7  # in the middle, not on a chunk boundary
    gh.add_fault(Fault(f"{prefix}/blob.bin", "drop", after_bytes=cut))
    dst = tmp_path / "out" / "blob.bin"
    dst.parent.mkdir()
    flowhub.download_url_to_file(f"{gh.url}{prefix}/blob.bin", str(dst), progress=False)

    assert dst.read_bytes() == data and sha256_file(dst) == sha256_bytes(data)
    log = [r for r in gh.requests if r.path == f"{prefix}/blob.bin"]
    assert [(r.status, r.fault, r.bytes_sent) for r in log[:1]] == [(200, "drop", cut)]
    # exactly one resume, starting where the drop happened (the bytes received before it were kept)
    assert [(r.range, r.status, r.bytes_sent) for r in log[1:]] == [(f"bytes={cut}-", 206, size - cut)]
    assert log[1].headers.get("If-Range") == etag_for((folder / "blob.bin").stat())  # validated resume
    assert leftovers(tmp_path / "out") == []


def test_stall_mid_body_times_out_then_resumes(gh, files, tmp_path, monkeypatch):
    folder, prefix = files
    data = os.urandom(2 * MiB + 999)
    (folder / "blob.bin").write_bytes(data)
    monkeypatch.setenv("FLOWHUB_TIMEOUT", "1")
    gh.add_fault(Fault(f"{prefix}/blob.bin", "stall", after_bytes=MiB + 5, seconds=60))
    dst = tmp_path / "blob.bin"
    flowhub.download_url_to_file(f"{gh.url}{prefix}/blob.bin", str(dst), progress=False)
    assert sha256_file(dst) == sha256_bytes(data)
    log = [r for r in gh.requests if r.path == f"{prefix}/blob.bin"]
    assert [(r.range, r.status) for r in log] == [(None, 200), (f"bytes={MiB + 5}-", 206)]


# -- HTTP errors and retries ------------------------------------------------------------------------
@pytest.mark.parametrize("retry_after", [None, "1"], ids=["backoff", "retry-after"])
def test_5xx_is_retried_then_succeeds(gh, example, hub_root, hub_dir, tmp_path, retry_after):
    url = weights_url(gh, example)
    headers = {"Retry-After": retry_after} if retry_after else None
    gh.add_fault(Fault("*/releases/download/*", "status", times=2, status=503, headers=headers))
    state = flowhub.load_state_dict_from_url(url, progress=False)
    assert_same_state(state, expected_state_dict(weights_asset(hub_root, example), tmp_path))
    assert [r.status for r in gh.requests if "/releases/download/" in r.path] == [503, 503, 200]


def test_5xx_beyond_retries_fails_clearly_and_caches_nothing(gh, example, hub_root, hub_dir, tmp_path, monkeypatch):
    url = weights_url(gh, example)
    monkeypatch.setenv("FLOWHUB_RETRIES", "1")
    gh.add_fault(Fault("*/releases/download/*", "status", times=None, status=503, headers={"Retry-After": "0"}))
    with pytest.raises(NetworkError, match=r"503") as info:
        flowhub.load_state_dict_from_url(url, progress=False)
    assert url in str(info.value)
    assert gh.count("/releases/download/") == 2  # the first try + FLOWHUB_RETRIES=1
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []
    gh.clear_faults()
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False),
                      expected_state_dict(weights_asset(hub_root, example), tmp_path))


@pytest.mark.parametrize("target", ["weights", "repo-archive"])
def test_stalled_server_times_out_within_a_minute(gh, example, hub_dir, monkeypatch, target):
    monkeypatch.setenv("FLOWHUB_TIMEOUT", "1")
    start = time.monotonic()
    if target == "weights":
        gh.add_fault(Fault("*/releases/download/*", "stall", times=None, seconds=120))
        with pytest.raises(RequestTimeoutError, match="FLOWHUB_TIMEOUT"):
            flowhub.load_state_dict_from_url(weights_url(gh, example), progress=False)
    else:
        gh.add_fault(Fault("*/legacy.zip/*", "stall", times=None, seconds=120))
        with pytest.raises(RequestTimeoutError, match="FLOWHUB_TIMEOUT"):
            flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    assert time.monotonic() - start < 30
    assert cached_files(hub_dir / "checkpoints") == []
    assert not (hub_dir / "flowhub-examples_tiny-models_v0.1").exists()
    assert leftovers(hub_dir) == []


def test_body_that_always_ends_early_is_incomplete(gh, example, hub_dir):
    gh.add_fault(Fault("*/releases/download/*", "drop", times=None, after_bytes=0))
    with pytest.raises(IncompleteDownloadError, match="nothing was saved"):
        flowhub.load_state_dict_from_url(weights_url(gh, example), progress=False)
    assert gh.count("/releases/download/") == 3  # the first try + FLOWHUB_RETRIES=2 without progress
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []
    assert not list((hub_dir / "checkpoints").rglob("*.json"))  # no completion record either


def test_body_that_keeps_ending_early_gives_up_after_a_bounded_number_of_resumes(gh, files, tmp_path):
    """Every answer (resumes included) stops after 700 bytes: progress each time, but never the end."""
    folder, prefix = files
    (folder / "blob.bin").write_bytes(os.urandom(MiB))
    gh.add_fault(Fault(f"{prefix}/blob.bin", "drop", times=None, after_bytes=700))
    dst = tmp_path / "blob.bin"
    with pytest.raises(IncompleteDownloadError, match="nothing was saved"):
        flowhub.download_url_to_file(f"{gh.url}{prefix}/blob.bin", str(dst), progress=False)
    log = [r for r in gh.requests if r.path == f"{prefix}/blob.bin"]
    assert len(log) == flowhub.net.download.MAX_RESUMES + 1
    assert [r.range for r in log[1:4]] == ["bytes=700-", "bytes=1400-", "bytes=2100-"]
    assert not dst.exists() and leftovers(tmp_path) == []


# -- integrity ----------------------------------------------------------------------------------------
def test_corrupt_body_with_check_hash_then_clean_retry(gh, example, hub_root, hub_dir, tmp_path):
    url = weights_url(gh, example)
    gh.add_fault(Fault("*/releases/download/*", "corrupt"))
    with pytest.raises(HashMismatchError, match="invalid hash value"):
        flowhub.load_state_dict_from_url(url, progress=False, check_hash=True)
    assert cached_files(hub_dir / "checkpoints") == [] and leftovers(hub_dir) == []
    # the same through download_url_to_file with an explicit prefix
    asset = weights_asset(hub_root, example)
    gh.add_fault(Fault("*/releases/download/*", "corrupt"))
    with pytest.raises(HashMismatchError):
        flowhub.download_url_to_file(url, str(tmp_path / "w.zip"), hash_prefix=sha256_file(asset)[:8], progress=False)
    assert not (tmp_path / "w.zip").exists() and leftovers(tmp_path) == []

    state = flowhub.load_state_dict_from_url(url, progress=False, check_hash=True)
    assert_same_state(state, expected_state_dict(asset, tmp_path))
    assert sha256_file(hub_dir / "checkpoints" / asset.name) == sha256_file(asset)


def test_corrupt_zip_without_hash_check_is_fetched_again(gh, example, hub_root, hub_dir, tmp_path):
    """No hash to check: the corrupt zip is cached, but extracting it fails; that failure must not repeat forever."""
    url = weights_url(gh, example)
    gh.add_fault(Fault("*/releases/download/*", "corrupt"))
    with pytest.raises(ArchiveError, match="corrupt"):
        flowhub.load_state_dict_from_url(url, progress=False)
    asset = weights_asset(hub_root, example)
    assert not (hub_dir / "checkpoints" / (asset.name + ".extracted")).exists()
    gh.clear_log()
    state = flowhub.load_state_dict_from_url(url, progress=False)
    assert_same_state(state, expected_state_dict(asset, tmp_path))
    assert gh.count("/releases/download/") == 1
    assert sha256_file(hub_dir / "checkpoints" / asset.name) == sha256_file(asset)


def test_html_page_instead_of_repo_archive(gh, hub_dir):
    gh.add_fault(Fault("*/legacy.zip/*", "html"))
    with pytest.raises(ArchiveError, match="HTML"):
        flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    assert not (hub_dir / "flowhub-examples_tiny-models_v0.1").exists()
    assert not (hub_dir / ".flowhub" / "entries" / "flowhub-examples_tiny-models_v0.1.json").exists()
    assert leftovers(hub_dir) == []
    assert flowhub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    assert (hub_dir / "flowhub-examples_tiny-models_v0.1" / "hubconf.py").is_file()


# -- servers that get Range wrong -------------------------------------------------------------------
class _ScriptedServer(http.server.ThreadingHTTPServer):
    """A loopback server answering each GET with the next scripted answer (then the last one forever).

    An answer is ``(status, headers, body, send_only)``: ``send_only`` bytes of ``body`` are sent and the
    connection is closed (a drop) when it is smaller than the body. Requests are logged as
    ``(Range header, If-Range header, status)``.
    """

    daemon_threads = True

    def __init__(self, script):
        self.script = list(script)
        self.log: List[Tuple[Optional[str], Optional[str], int]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/blob.bin"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        server: _ScriptedServer = self.server  # type: ignore[assignment]
        with server.lock:
            status, headers, body, send_only = server.script.pop(0) if len(server.script) > 1 else server.script[0]
            server.log.append((self.headers.get("Range"), self.headers.get("If-Range"), status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:send_only])
        self.wfile.flush()
        if send_only < len(body):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


def test_server_answering_200_to_range_restarts_from_zero(tmp_path):
    """A server that ignores Range (like ``python -m http.server``): SimpleHTTPRequestHandler serves a copy
    of the file; the first answer drops, the Range request gets 200 + the full body, and flowhub must start
    over instead of appending it."""
    data = os.urandom(MiB + 4321)
    root = tmp_path / "www"
    root.mkdir()
    (root / "blob.bin").write_bytes(data)
    log: List[Tuple[Optional[str], int]] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        drops = [len(data) // 3]

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

        def send_response(self, code, message=None):
            log.append((self.headers.get("Range"), code))
            super().send_response(code, message)

        def copyfile(self, source, outputfile):
            if self.drops:
                outputfile.write(source.read(self.drops.pop()))
                outputfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            super().copyfile(source, outputfile)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        dst = tmp_path / "blob.bin"
        flowhub.download_url_to_file(f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin", str(dst), progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert log == [(None, 200), (f"bytes={len(data) // 3}-", 200)]  # it asked to resume, got everything again
    assert dst.stat().st_size == len(data) and sha256_file(dst) == sha256_bytes(data)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("change", ["size", "etag"])
def test_206_for_a_changed_file_is_not_appended(tmp_path, change):
    """The file changed on the server between the drop and the resume, and the server ignores If-Range:
    it answers 206 with a part of the *new* file (another total size, or another ETag). Neither appending
    it nor taking it as the start of the file is right: flowhub must fetch the new file from byte 0."""
    old = os.urandom(200_000)
    new = os.urandom(250_000 if change == "size" else 200_000)
    cut = 80_000
    old_tag, new_tag = ('"old"', '"new"') if change == "etag" else (None, None)

    def headers(tag, extra=None):
        return {**({"ETag": tag} if tag else {}), **(extra or {})}

    server = _ScriptedServer([
        (200, headers(old_tag), old, cut),
        (206, headers(new_tag, {"Content-Range": f"bytes {cut}-{len(new) - 1}/{len(new)}"}), new[cut:], len(new) - cut),
        (200, headers(new_tag), new, len(new)),
    ])
    try:
        dst = tmp_path / "blob.bin"
        flowhub.download_url_to_file(server.url, str(dst), progress=False)
    finally:
        server.stop()
    assert dst.read_bytes() == new
    assert [(r, s) for r, _, s in server.log] == [(None, 200), (f"bytes={cut}-", 206), (None, 200)]
    if change == "etag":
        assert server.log[1][1] == '"old"'  # If-Range was sent; this server just ignored it
    assert leftovers(tmp_path) == []


# -- SIGKILL in the middle ----------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_sigkill_mid_weights_download_then_next_process_succeeds(gh, files, hub_dir, tmp_path):
    folder, prefix = files
    flow.manual_seed(0)
    state = {"w": flow.randn(6 * MiB), "b": flow.arange(10, dtype=flow.float32)}  # ~24 MiB checkpoint
    raw = zip_checkpoint(state, "big", tmp_path / "big.zip", tmp_path)
    asset = folder / f"big-{sha256_file(raw)[:8]}.zip"
    shutil.move(str(raw), asset)
    size = asset.stat().st_size
    url = f"{gh.url}{prefix}/{asset.name}"
    code = ("import hashlib, flowhub\n"
            f"sd = flowhub.load_state_dict_from_url({url!r}, check_hash=True, progress=False)\n"
            "h = hashlib.sha256()\n"
            "for k in sorted(sd):\n"
            "    h.update(k.encode()); h.update(sd[k].numpy().tobytes())\n"
            "print('DIGEST', h.hexdigest())\n")
    gh.add_fault(Fault(f"{prefix}/*", "slow", seconds=30))
    checkpoints = hub_dir / "checkpoints"
    partial = kill_python_when(code, lambda: [p for p in checkpoints.glob("*.partial") if p.stat().st_size > 0],
                               "a non-empty *.partial")[0]
    assert 0 < partial.stat().st_size < size
    assert not (checkpoints / asset.name).exists()  # nothing under the final name

    gh.clear_faults()
    gh.clear_log()
    done = run_python(code, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"DIGEST {state_digest(state)}" in done.stdout
    cached = checkpoints / asset.name
    assert cached.stat().st_size == size and sha256_file(cached) == sha256_file(asset)
    # the leftover was not used as a head start: one plain request for the whole file
    fetches = [(r.range, r.status, r.bytes_sent) for r in gh.requests if r.path.endswith(asset.name)]
    assert fetches == [(None, 200, size)]
    # The killed process's temp file is still there (nothing can tell a dead writer's from a live one's),
    # under a name no lookup uses, and it is known as a leftover (``flowhub cache prune`` removes it).
    assert cached_files(checkpoints) == sorted([asset.name, asset.name + ".extracted", partial.name])
    assert str(partial) in inventory.stale_temporaries(str(hub_dir), min_age=0)


@pytest.mark.timeout(120)
def test_sigkill_leftover_is_not_listed_as_a_cache_entry(gh, example, hub_dir):
    url = weights_url(gh, example)
    gh.add_fault(Fault("*/releases/download/*", "slow", seconds=30))
    kill_python_when(f"import flowhub; flowhub.load_state_dict_from_url({url!r}, progress=False)",
                     lambda: list((hub_dir / "checkpoints").glob("*.partial")), "a *.partial")
    gh.clear_faults()
    flowhub.load_state_dict_from_url(url, progress=False)
    assert [(e.kind, e.name) for e in inventory.scan(str(hub_dir))] == [("weights", url.rsplit("/", 1)[1])]


@pytest.mark.timeout(120)
def test_sigkill_mid_repo_download_then_list_works(gh, hub_dir, capfd):
    gh.add_fault(Fault("*/legacy.zip/*", "slow", seconds=30))
    kill_python_when(f"import flowhub; print(flowhub.list({REPO + ':v0.1'!r}, trust_repo=True))",
                     lambda: glob.glob(str(hub_dir / ".flowhub" / "tmp" / "*" / "*.partial")), "the archive download")
    assert not (hub_dir / "flowhub-examples_tiny-models_v0.1").exists()
    gh.clear_faults()
    gh.clear_log()
    capfd.readouterr()
    # The killed process held the repo lock: it must have died with it (FLOWHUB_LOCK_TIMEOUT is 600 s here).
    assert flowhub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    assert "waiting for another process" not in capfd.readouterr().err
    assert [r.status for r in gh.requests if "legacy.zip" in r.path] == [200]
    assert (hub_dir / "flowhub-examples_tiny-models_v0.1" / "hubconf.py").is_file()
    assert flowhub.load(f"{REPO}:v0.1", "version") == "0.1"


# -- corrupted cache entries -------------------------------------------------------------------------
def test_truncated_cached_weights_are_fetched_again(gh, example, hub_root, hub_dir, tmp_path):
    url = weights_url(gh, example)
    asset = weights_asset(hub_root, example)
    want = expected_state_dict(asset, tmp_path)
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    cached = hub_dir / "checkpoints" / asset.name
    with open(cached, "r+b") as f:
        f.truncate(cached.stat().st_size // 2)
    gh.clear_log()
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    assert gh.count("/releases/download/") == 1
    assert sha256_file(cached) == sha256_file(asset)
    gh.clear_log()
    flowhub.load_state_dict_from_url(url, progress=False)
    assert gh.requests == []  # and now it is a cache hit again


def test_repo_folder_without_hubconf_is_fetched_again(gh, hub_dir):
    assert flowhub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    folder = hub_dir / "flowhub-examples_tiny-models_v0.1"
    (folder / "hubconf.py").unlink()
    gh.clear_log()
    assert flowhub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    assert gh.count("legacy.zip") == 1
    assert (folder / "hubconf.py").is_file() and leftovers(hub_dir) == []


def test_damaged_extracted_checkpoint_is_extracted_again(gh, example, hub_root, hub_dir, tmp_path):
    url = weights_url(gh, example)
    asset = weights_asset(hub_root, example)
    want = expected_state_dict(asset, tmp_path)
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    extracted = hub_dir / "checkpoints" / (asset.name + ".extracted")
    (next(extracted.rglob("pickled_data"))).unlink()
    gh.clear_log()
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    assert gh.requests == []  # the zip itself was fine: extracted again, not downloaded again
    assert list(extracted.rglob("pickled_data"))


# -- hostile archives -----------------------------------------------------------------------------------
def _symlink_member(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def _hostile_zip(kind: str, outside: Path) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        zf.writestr("ckpt/pickled_data", b"not really")
        if kind == "dotdot":
            zf.writestr("ckpt/../../evil", b"pwned")
        elif kind == "dotdot-backslash":
            zf.writestr("ckpt\\..\\..\\evil", b"pwned")
        elif kind == "absolute":
            zf.writestr(str(outside / "evil"), b"pwned")
        elif kind == "symlink-relative":
            _symlink_member(zf, "ckpt/link", "../../../../../../../../../..")
            zf.writestr("ckpt/link/evil", b"pwned")
        elif kind == "symlink-absolute":
            _symlink_member(zf, "ckpt/link", str(outside))
            zf.writestr("ckpt/link/evil", b"pwned")
        elif kind == "symlink-chain":
            # Each link stays inside when read on its own ('d' is 'ckpt' itself, so 'ckpt/d/d/.../e' is
            # lexically deep but really sits in 'ckpt'); together they reach any folder on the machine.
            n = len(outside.parts) + 10  # enough '..' to reach '/' from the extraction folder (< 40 links)
            deep = "ckpt/" + "d/" * n + "e"
            _symlink_member(zf, "ckpt/d", ".")
            _symlink_member(zf, deep, "../" * n + str(outside).lstrip("/"))
            zf.writestr(deep + "/evil", b"pwned")
        elif kind == "symlink-late-binding":
            # Links checked when created, while the names they go through do not exist yet: 'L' -> 'a1/...'
            # looks inside; then a1 -> a2/../.., a2 -> a3/../.., ..., ak -> '..' make a1 climb 2k-1 levels
            # (to '/': the extraction folder is at most len(outside.parts) + 8 deep); finally a *regular
            # file* named like the link is written through it.
            k = (len(outside.parts) + 8) // 2 + 2
            _symlink_member(zf, "ckpt/L", "a1/" + str(outside / "evil").lstrip("/"))
            for i in range(1, k):
                _symlink_member(zf, f"ckpt/a{i}", f"a{i + 1}/../..")
            _symlink_member(zf, f"ckpt/a{k}", "..")
            zf.writestr("ckpt/L", b"pwned")
    return buf.getvalue()


def _assert_hostile_zip_rejected(gh, files, hub_dir, tmp_path, kind):
    folder, prefix = files
    outside = tmp_path / "outside"
    outside.mkdir()
    name = f"hostile-{kind}.zip"
    (folder / name).write_bytes(_hostile_zip(kind, outside))
    before = {str(p) for p in tmp_path.rglob("*")}
    with pytest.raises(Exception) as info:
        flowhub.load_state_dict_from_url(f"{gh.url}{prefix}/{name}", progress=False)
    assert list(outside.iterdir()) == []
    assert isinstance(info.value, ArchiveError), repr(info.value)
    checkpoints = hub_dir / "checkpoints"
    assert cached_files(checkpoints) == []  # no extracted folder, and the unusable zip is not kept either
    assert leftovers(hub_dir) == []
    new = {str(p) for p in tmp_path.rglob("*")} - before
    assert all(p.startswith(str(checkpoints)) or str(checkpoints).startswith(p) for p in new), new
    assert not [p for p in new if Path(p).name == "evil"]


@pytest.mark.parametrize("kind", ["dotdot", "dotdot-backslash", "absolute", "symlink-relative", "symlink-absolute"])
def test_hostile_weight_archive_is_rejected(gh, files, hub_dir, tmp_path, kind):
    _assert_hostile_zip_rejected(gh, files, hub_dir, tmp_path, kind)


def test_hostile_symlink_chain_is_rejected(gh, files, hub_dir, tmp_path):
    _assert_hostile_zip_rejected(gh, files, hub_dir, tmp_path, "symlink-chain")


def test_hostile_late_bound_symlinks_are_rejected(gh, files, hub_dir, tmp_path):
    _assert_hostile_zip_rejected(gh, files, hub_dir, tmp_path, "symlink-late-binding")


# -- zipped OneFlow checkpoints ---------------------------------------------------------------------
def _two_states():
    flow.manual_seed(1)
    first = {"w": flow.randn(4, 3), "b": flow.randn(3)}
    second = {"w": flow.randn(4, 3), "b": flow.randn(3)}
    return first, second


def test_checkpoint_zip_without_directory_entries_loads(gh, files, tmp_path):
    folder, prefix = files
    state, _ = _two_states()
    zip_checkpoint(state, "net", folder / "filesonly.zip", tmp_path, dir_entries=False, first="meta")
    with zipfile.ZipFile(folder / "filesonly.zip") as zf:
        names = zf.namelist()
    assert not any(n.endswith("/") for n in names) and not names[0].endswith("pickled_data")
    assert_same_state(flowhub.load_state_dict_from_url(f"{gh.url}{prefix}/filesonly.zip", progress=False), state)


def test_two_zips_with_the_same_inner_folder_keep_their_own_weights(gh, files, tmp_path):
    folder, prefix = files
    first, second = _two_states()
    zip_checkpoint(first, "model", folder / "first.zip", tmp_path)
    zip_checkpoint(second, "model", folder / "second.zip", tmp_path)
    for _ in range(2):  # also when both are already extracted
        assert_same_state(flowhub.load_state_dict_from_url(f"{gh.url}{prefix}/first.zip", progress=False), first)
        assert_same_state(flowhub.load_state_dict_from_url(f"{gh.url}{prefix}/second.zip", progress=False), second)


def test_finished_checkpoint_is_not_extracted_again(gh, example, hub_root, hub_dir, tmp_path):
    url = weights_url(gh, example)
    asset = weights_asset(hub_root, example)
    want = expected_state_dict(asset, tmp_path)
    assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    extracted = hub_dir / "checkpoints" / (asset.name + ".extracted")

    def snapshot():
        return {str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in [extracted, *extracted.rglob("*")]}

    before = snapshot()
    time.sleep(0.05)  # so that a rewrite would show in mtime_ns even on coarse clocks
    gh.clear_log()
    for _ in range(2):
        assert_same_state(flowhub.load_state_dict_from_url(url, progress=False), want)
    assert snapshot() == before
    assert gh.requests == []


def test_same_weights_published_again_keep_their_extracted_folder(gh, example, hub_root, hub_dir, tmp_path):
    """force_reload downloads the weights again (same bytes, new file): the extracted folder that other
    processes may be reading at that moment must stay where it is, not be swapped for a new copy."""
    asset = weights_asset(hub_root, example)
    want = expected_state_dict(asset, tmp_path)
    assert_same_state(flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True).state_dict(), want)
    cached = hub_dir / "checkpoints" / asset.name
    extracted = hub_dir / "checkpoints" / (asset.name + ".extracted")

    def snapshot():  # its completion record is rewritten (atomically, so the folder's mtime moves): leave it out
        files = {str(p): (p.lstat().st_ino, p.lstat().st_mtime_ns) for p in extracted.rglob("*")
                 if not p.name.endswith("-complete.json")}
        return extracted.stat().st_ino, files

    before, cached_inode = snapshot(), cached.stat().st_ino
    gh.clear_log()
    model = flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True, force_reload=True)
    assert_same_state(model.state_dict(), want)
    assert gh.count("/releases/download/") == 1 and cached.stat().st_ino != cached_inode  # downloaded again
    assert snapshot() == before


def test_a_download_without_progress_starts_no_thread(gh, files, tmp_path):
    """A fresh process's ``download_url_to_file(..., progress=False)`` runs in its one thread (a tqdm
    instance, even a disabled one, would start tqdm's monitor thread)."""
    folder, prefix = files
    (folder / "blob.bin").write_bytes(os.urandom(MiB))
    code = ("import threading, sys, flowhub\n"
            "flowhub.download_url_to_file(sys.argv[1], sys.argv[2], progress=False)\n"
            "quiet = [t.name for t in threading.enumerate()]\n"
            "flowhub.download_url_to_file(sys.argv[1], sys.argv[2] + '.2', progress=True)\n"
            "print(quiet, threading.active_count())\n")
    proc = subprocess.run([sys.executable, "-c", code, f"{gh.url}{prefix}/blob.bin", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:1] == ["['MainThread']"], proc.stdout
    assert "100%" in proc.stderr  # with progress the bar is still shown
    assert (tmp_path / "b").read_bytes() == (folder / "blob.bin").read_bytes()
