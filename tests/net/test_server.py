"""Tests for flowhub.server: real git repositories, real HTTP on 127.0.0.1, no mocks."""
from __future__ import annotations

import http.client
import io
import os
import re
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import requests

from flowhub.server import Fault, GitHubServer, RequestRecord

PY = sys.executable
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Tester", "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "Tester", "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
}
BRANCHES = ["b1", "b2", "b3", "both", "dev/x", "main"]


def git(cwd: Path, *args: str, data: bytes | None = None) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, input=data,
                          capture_output=True, check=True)
    return proc.stdout.decode().strip()


def commit(work: Path, name: str, text: str, message: str) -> str:
    (work / name).parent.mkdir(parents=True, exist_ok=True)
    (work / name).write_text(text)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", message)
    return git(work, "rev-parse", "HEAD")


def many_commits(work: Path, n: int) -> list[str]:
    """``n`` empty commits on branch ``many`` via fast-import (fast, deterministic)."""
    lines = []
    for i in range(1, n + 1):
        msg = f"commit {i}".encode()
        lines.append(b"commit refs/heads/many\nmark :%d\n" % i)
        lines.append(b"committer T <t@t> 1700000000 +0000\ndata %d\n%s\n" % (len(msg), msg))
        if i > 1:
            lines.append(b"from :%d\n" % (i - 1))
    git(work, "fast-import", "--quiet", data=b"".join(lines))
    return git(work, "rev-list", "many").split()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """ROOT with a bare ``Owner/Repo.git``, a work tree ``wt/Tree``, assets and a secret."""
    base = tmp_path_factory.mktemp("site")
    root = base / "root"
    work = base / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    shas = {"first": commit(work, "hubconf.py", "dependencies = []\n", "first")}
    shas["main"] = commit(work, "pkg/mod.py", "X = 1\n", "second\n\nbody line")
    for name in ("b1", "b2", "b3", "dev/x"):
        git(work, "branch", name)
    git(work, "checkout", "-q", "-b", "both")
    shas["both_branch"] = commit(work, "branch.txt", "b\n", "on branch both")
    git(work, "checkout", "-q", "main")
    git(work, "tag", "-a", "v1", "-m", "annotated", shas["first"])
    git(work, "tag", "v2")
    git(work, "tag", "both", shas["first"])
    shas["many"] = many_commits(work, 1500)
    bare = root / "Owner" / "Repo.git"
    bare.parent.mkdir(parents=True)
    git(base, "clone", "-q", "--bare", str(work), str(bare))
    for repo in (work, bare):  # keep the objects (for ambiguous prefixes), drop the branch
        git(repo, "branch", "-D", "many")
    # a work tree repo and a bare repo without the .git suffix
    tree = root / "wt" / "Tree"
    git(base, "clone", "-q", str(work), str(tree))
    git(base, "clone", "-q", "--bare", str(work), str(root / "plain" / "barerepo"))
    assets = root / "Owner" / "Repo" / "releases" / "download" / "v1"
    assets.mkdir(parents=True)
    payload = os.urandom(200_000)
    (assets / "weights.bin").write_bytes(payload)
    (base / "secret.txt").write_text("top secret")
    (root / "Owner" / "Repo" / "escape").symlink_to(base / "secret.txt")
    return {"root": root, "work": work, "base": base, "shas": shas, "payload": payload,
            "asset": "/Owner/Repo/releases/download/v1/weights.bin"}


@pytest.fixture(scope="module")
def server(site):
    with GitHubServer(site["root"]) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(request):
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        srv.clear_faults()
        srv.clear_log()
        srv.reject_tokens = False


def ambiguous_prefix(shas: list[str]) -> str:
    seen: dict[str, str] = {}
    for sha in shas:
        if sha[:4] in seen:
            return sha[:4]
        seen[sha[:4]] = sha
    raise AssertionError("no shared 4-hex prefix")


def get(srv: GitHubServer, path: str, **kw) -> requests.Response:
    kw.setdefault("timeout", 10)
    kw.setdefault("allow_redirects", False)
    return requests.get(srv.url + path, **kw)


# --- API ------------------------------------------------------------------------------


def test_branches_pagination(server, site):
    api = server.api_url + "/repos/Owner/Repo/branches"
    names, page = [], 1
    while True:
        r = requests.get(api, params={"per_page": 2, "page": page}, timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        items = r.json()
        if not items:
            assert 'rel="next"' not in r.headers.get("Link", "")
            break
        assert len(items) <= 2
        for item in items:
            assert re.fullmatch(r"[0-9a-f]{40}", item["commit"]["sha"])
            assert item["commit"]["url"].endswith(item["commit"]["sha"])
        if page < 3:
            assert f'per_page=2&page={page + 1}>; rel="next"' in r.headers["Link"]
            assert 'page=3>; rel="last"' in r.headers["Link"]
        names += [i["name"] for i in items]
        page += 1
    assert names == BRANCHES and page == 4
    by_name = {i["name"]: i["commit"]["sha"] for i in requests.get(api, timeout=10).json()}
    assert by_name["main"] == site["shas"]["main"]
    assert by_name["both"] == site["shas"]["both_branch"]
    everything = requests.get(api, params={"per_page": 500}, timeout=10)
    assert len(everything.json()) == len(BRANCHES) and "Link" not in everything.headers


def test_tags_peeled_and_sorted(server, site):
    r = requests.get(server.api_url + "/repos/Owner/Repo/tags?per_page=100&page=1", timeout=10)
    tags = {i["name"]: i["commit"]["sha"] for i in r.json()}
    assert [i["name"] for i in r.json()] == ["both", "v1", "v2"]
    assert tags["v1"] == site["shas"]["first"]  # annotated tag -> the commit, not the tag object
    assert tags["v2"] == site["shas"]["main"]
    assert requests.get(server.api_url + "/repos/Owner/Repo/tags?page=2", timeout=10).json() == []


def test_repo_info_and_unknown_repo(server):
    r = requests.get(server.api_url + "/repos/owner/REPO", timeout=10)
    assert r.status_code == 200
    data = r.json()
    assert (data["name"], data["full_name"], data["default_branch"]) == ("Repo", "Owner/Repo", "main")
    r = requests.get(server.api_url + "/repos/Owner/Nope", timeout=10)
    assert r.status_code == 404 and r.json()["message"] == "Not Found"
    assert requests.get(server.api_url + "/repos/Owner/Nope/branches", timeout=10).status_code == 404


def test_commits_api(server, site):
    shas = site["shas"]
    url = server.api_url + "/repos/Owner/Repo/commits/"
    for ref, want in [("main", shas["main"]), ("v1", shas["first"]), ("dev/x", shas["main"]),
                      (shas["main"], shas["main"]), (shas["first"][:7], shas["first"]),
                      (shas["first"][:4].upper(), None)]:
        r = requests.get(url + ref, timeout=10)
        if want is None:  # 4 upper-case hex: either unique or ambiguous, never a 500
            assert r.status_code in (200, 422)
            continue
        assert r.status_code == 200, ref
        assert r.json()["sha"] == want
    assert requests.get(url + "main", timeout=10).json()["commit"]["message"] == "second\n\nbody line"
    r = requests.get(url + "deadbeef", timeout=10)
    assert r.status_code == 404 and r.json()["message"] == "No commit found for SHA: deadbeef"
    assert requests.get(url + "0" * 40, timeout=10).status_code == 404
    prefix = ambiguous_prefix(shas["many"])
    assert requests.get(url + prefix, timeout=10).status_code == 422


# --- web routes and archives ------------------------------------------------------------


def test_tree_probe(server):
    assert get(server, "/Owner/Repo/tree/main/").status_code == 200
    assert get(server, "/Owner/Repo/tree/main").status_code == 200
    assert get(server, "/owner/repo/tree/dev/x/").status_code == 200
    assert get(server, "/Owner/Repo/tree/main/pkg").status_code == 200  # ref + path
    assert get(server, "/Owner/Repo/tree/master/").status_code == 404
    assert get(server, "/Owner/Missing/tree/main/").status_code == 404


def test_zipball_redirect_and_archive(server, site):
    sha = site["shas"]["main"]
    r = get(server, "/Owner/Repo/zipball/main")
    assert r.status_code == 302
    assert r.headers["Location"] == server.url + "/_codeload/Owner/Repo/legacy.zip/main"
    r = get(server, "/Owner/Repo/zipball/main", allow_redirects=True)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
    assert int(r.headers["Content-Length"]) == len(r.content)
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert zf.comment.decode() == sha
    first = zf.infolist()[0]
    assert first.filename == f"Owner-Repo-{sha[:7]}/" and first.is_dir()
    assert zf.read(f"Owner-Repo-{sha[:7]}/pkg/mod.py") == b"X = 1\n"
    names = zf.namelist()
    for i, name in enumerate(names):  # every directory entry precedes what it contains
        parent = name.rstrip("/").rpartition("/")[0] + "/"
        assert i == 0 or names.index(parent) < i
    assert zf.testzip() is None


@pytest.mark.parametrize("ref,key", [
    ("dev/x", "main"), ("refs/heads/both", "both_branch"), ("refs/tags/both", "first"),
    ("v1", "first"), ("refs/tags/v1", "first"), ("FULL", "first"), ("SHORT", "main"),
])
def test_zipball_ref_forms(server, site, ref, key):
    want = site["shas"][key]
    ref = {"FULL": site["shas"]["first"], "SHORT": site["shas"]["main"][:7]}.get(ref, ref)
    r = get(server, f"/Owner/Repo/zipball/{ref}", allow_redirects=True)
    assert r.status_code == 200, ref
    assert zipfile.ZipFile(io.BytesIO(r.content)).comment.decode() == want
    assert r.history[0].headers["Location"].endswith(f"/legacy.zip/{ref}")


def test_zipball_ambiguous_and_unknown(server, site):
    r = get(server, "/Owner/Repo/zipball/both")
    assert r.status_code == 300 and "refs/heads/both" in r.text
    assert get(server, "/_codeload/Owner/Repo/legacy.zip/both").status_code == 300
    assert get(server, "/Owner/Repo/zipball/nope").status_code == 404
    assert get(server, "/Owner/Repo/zipball/" + ambiguous_prefix(site["shas"]["many"])).status_code == 404
    assert get(server, "/_codeload/Owner/Repo/legacy.zip/nope").status_code == 404


def test_case_insensitive_names_keep_disk_spelling(server, site):
    sha = site["shas"]["main"]
    r = get(server, "/OWNER/repo/zipball/main", allow_redirects=True)
    assert zipfile.ZipFile(io.BytesIO(r.content)).namelist()[0] == f"Owner-Repo-{sha[:7]}/"
    assert get(server, "/oWnEr/rEpO/tree/main").status_code == 200


def test_worktree_and_plain_bare_repos(server, site):
    for repo in ("wt/Tree", "plain/barerepo"):
        r = get(server, f"/{repo}/zipball/main", allow_redirects=True)
        assert r.status_code == 200, repo
        assert zipfile.ZipFile(io.BytesIO(r.content)).comment.decode() == site["shas"]["main"]
        assert requests.get(f"{server.api_url}/repos/{repo}", timeout=10).json()["default_branch"] == "main"


def test_repo_added_after_start(server, site, tmp_path):
    dest = site["root"] / "late" / "comer.git"
    git(tmp_path, "clone", "-q", "--bare", str(site["work"]), str(dest))
    assert get(server, "/late/comer/tree/main").status_code == 200


def test_broken_repo_gives_500_and_server_survives(server, site, capfd):
    bad = site["root"] / "broken" / "repo.git"
    for d in ("objects", "refs"):
        (bad / d).mkdir(parents=True, exist_ok=True)
    (bad / "HEAD").write_text("garbage\n")
    r = requests.get(server.api_url + "/repos/broken/repo/branches", timeout=10)
    assert r.status_code == 500 and r.json()["message"]
    assert get(server, "/Owner/Repo/tree/main").status_code == 200
    err = capfd.readouterr().err
    assert "flowhub.server:" in err and len(err.strip().splitlines()) == 1


def test_keep_alive_every_response_is_delimited(server, site):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    paths = ["/Owner/Repo/zipball/main", "/Owner/Repo/zipball/both", "/nope/nope/x",
             "/api/repos/Owner/Repo", site["asset"], "/_codeload/Owner/Repo/legacy.zip/main"]
    for path in paths:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert int(resp.getheader("Content-Length")) == len(body), path
    conn.request("GET", site["asset"], headers={"Range": "bytes=10-19"})
    assert conn.getresponse().read() == site["payload"][10:20]
    conn.request("HEAD", site["asset"])
    resp = conn.getresponse()
    assert resp.read() == b"" and resp.getheader("Content-Length") == str(len(site["payload"]))
    conn.close()


# --- static files -----------------------------------------------------------------------


def test_static_full_range_and_validators(server, site):
    data, path = site["payload"], site["asset"]
    r = get(server, path)
    assert r.status_code == 200 and r.content == data
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Length"] == str(len(data))
    etag = r.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")
    assert "Last-Modified" in r.headers

    r = get(server, path, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    r = get(server, path, headers={"Range": "bytes=199000-"})
    assert r.status_code == 206 and r.content == data[199000:]
    r = get(server, path, headers={"Range": "bytes=-500"})
    assert r.status_code == 206 and r.content == data[-500:]
    assert r.headers["Content-Range"] == f"bytes {len(data) - 500}-{len(data) - 1}/{len(data)}"
    r = get(server, path, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    r = get(server, path, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[5:10]
    r = get(server, path, headers={"Range": "bytes=5-9", "If-Range": '"stale"'})
    assert r.status_code == 200 and r.content == data
    r = get(server, path, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    r = requests.head(server.url + path, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Length"] == str(len(data)) and not r.content
    assert r.headers["ETag"] == etag


def test_static_etag_changes_when_file_changes(server, site, tmp_path):
    target = site["root"] / "files" / "note.txt"
    target.parent.mkdir(exist_ok=True)
    target.write_text("one")
    first = get(server, "/files/note.txt").headers["ETag"]
    tmp = target.with_suffix(".tmp")
    tmp.write_text("two!")
    os.replace(tmp, target)
    r = get(server, "/files/note.txt")
    assert r.text == "two!" and r.headers["ETag"] != first


def raw_get(srv: GitHubServer, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/Owner/../../secret.txt", "/%2e%2e/secret.txt", "/Owner/%2E%2E/%2e%2e/secret.txt",
    "/Owner/..%2f..%2fsecret.txt", "/Owner/Repo/escape", "/Owner/Repo.git/HEAD",
    "/Owner/Repo.git/config", "/wt/Tree/.git/config", "/wt/Tree/.GIT/HEAD",
    "/wt/Tree/%2egit/config", "/plain/barerepo/HEAD", "/Owner/Repo/releases/download/v1/",
])
def test_static_refuses_unsafe_paths(server, path):
    status, body = raw_get(server, path)
    assert status == 404, path
    assert b"top secret" not in body and b"[core]" not in body and b"ref:" not in body


def test_worktree_files_are_served(server):
    status, body = raw_get(server, "/wt/Tree/hubconf.py")
    assert status == 200 and body == b"dependencies = []\n"


# --- auth, faults, log ------------------------------------------------------------------


def test_reject_tokens(server, site):
    server.reject_tokens = True
    r = get(server, "/api/repos/Owner/Repo/branches", headers={"Authorization": "token abc"})
    assert r.status_code == 401 and r.json()["message"] == "Bad credentials"
    assert get(server, "/api/repos/Owner/Repo/branches").status_code == 200
    records = server.requests
    assert [(r.status, r.authorized) for r in records] == [(401, True), (200, False)]
    assert records[0].headers["authorization"] == "token abc"
    server.reject_tokens = False
    assert get(server, "/api/repos/Owner/Repo", headers={"Authorization": "token abc"}).status_code == 200


def test_fault_status_times_and_headers(server):
    fault = server.add_fault(Fault("/api/*", "status", times=2, status=503,
                                   headers={"Retry-After": "1"}))
    codes = [requests.get(server.api_url + "/repos/Owner/Repo", timeout=10) for _ in range(3)]
    assert [r.status_code for r in codes] == [503, 503, 200]
    assert codes[0].headers["Retry-After"] == "1"
    assert fault.times == 0 and fault.hits == 2
    assert server.count("/api/", status=503) == 2 and server.count("/api/", status=200) == 1
    assert [r.fault for r in server.requests] == ["status", "status", None]


def test_fault_ratelimit(server):
    server.add_fault(Fault("*/branches", "ratelimit", times=None))
    for _ in range(2):
        r = requests.get(server.api_url + "/repos/Owner/Repo/branches", timeout=10)
        assert r.status_code == 403
        assert r.headers["X-RateLimit-Remaining"] == "0"
        assert int(r.headers["X-RateLimit-Reset"]) > time.time()
        assert r.json()["message"] == "API rate limit exceeded for 127.0.0.1."
    assert requests.get(server.api_url + "/repos/Owner/Repo/tags", timeout=10).status_code == 200


def test_fault_drop(server, site):
    server.add_fault(Fault("*/weights.bin", "drop", times=2, after_bytes=1000))
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
        get(server, site["asset"])
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", site["asset"])
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == str(len(site["payload"]))
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == site["payload"][:1000]
    conn.close()
    records = server.requests
    assert [(r.bytes_sent, r.fault, r.status) for r in records] == [(1000, "drop", 200)] * 2
    assert get(server, site["asset"]).content == site["payload"]  # times=2: the third is fine


def test_fault_drop_on_range_keeps_content_range(server, site):
    server.add_fault(Fault("*/weights.bin", "drop", after_bytes=10))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", site["asset"], headers={"Range": "bytes=100-"})
    resp = conn.getresponse()
    assert resp.status == 206 and resp.getheader("Content-Range").startswith("bytes 100-")
    with pytest.raises(http.client.IncompleteRead) as info:
        resp.read()
    assert info.value.partial == site["payload"][100:110]
    conn.close()


def test_fault_stall_read_timeout(server, site):
    server.add_fault(Fault("*/weights.bin", "stall", after_bytes=100, seconds=30))
    start = time.monotonic()
    with pytest.raises(requests.exceptions.ConnectionError):  # ReadTimeout surfaces mid-body
        r = requests.get(server.url + site["asset"], timeout=(5, 1))
        r.content  # noqa: B018
    assert time.monotonic() - start < 5
    rec = server.requests[0]
    assert rec.fault == "stall" and rec.bytes_sent == 100


def test_fault_stall_before_headers_body(server, site):
    server.add_fault(Fault("/api/*", "stall", seconds=30))
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(server.api_url + "/repos/Owner/Repo", timeout=(5, 1)).json()


def test_fault_corrupt_html_slow(server, site):
    data = site["payload"]
    server.add_fault(Fault("*/weights.bin", "corrupt"))
    r = get(server, site["asset"])
    assert r.status_code == 200 and len(r.content) == len(data) and r.content != data
    assert sum(a != b for a, b in zip(r.content, data)) == 3

    server.add_fault(Fault("*/legacy.zip/*", "html"))
    r = get(server, "/Owner/Repo/zipball/main", allow_redirects=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert not zipfile.is_zipfile(io.BytesIO(r.content))

    server.add_fault(Fault("*/weights.bin", "slow", seconds=0.6))
    start = time.monotonic()
    assert get(server, site["asset"]).content == data
    assert time.monotonic() - start >= 0.4


def test_fault_methods_and_patterns(server, site):
    fault = server.add_fault(Fault("*/weights.bin", "status", status=500, times=None))
    assert requests.head(server.url + site["asset"], timeout=10).status_code == 200  # GET only
    assert get(server, site["asset"]).status_code == 500
    assert get(server, "/api/repos/Owner/Repo").status_code == 200
    server.clear_faults()
    assert get(server, site["asset"]).status_code == 200
    assert fault.hits == 1
    server.add_fault(Fault("*", "status", status=502, methods=("HEAD",)))
    assert requests.head(server.url + site["asset"], timeout=10).status_code == 502
    with pytest.raises(ValueError):
        Fault("*", "explode")


def test_request_log(server, site):
    get(server, "/api/repos/Owner/Repo/branches?per_page=2&page=1")
    get(server, site["asset"], headers={"Range": "bytes=0-9"})
    requests.head(server.url + site["asset"], timeout=10)
    get(server, "/nope")
    records = server.requests
    assert all(isinstance(r, RequestRecord) for r in records)
    assert records[0].path == "/api/repos/Owner/Repo/branches"
    assert records[0].query == "per_page=2&page=1"
    assert records[1].range == "bytes=0-9" and records[1].status == 206 and records[1].bytes_sent == 10
    assert records[2].method == "HEAD" and records[2].bytes_sent == 0
    assert records[1].headers["User-Agent"].startswith("python-requests")
    assert server.count("weights.bin") == 1
    assert server.count("weights.bin", method=None) == 2
    assert server.count(status=404) == 1
    server.clear_log()
    assert server.requests == [] and server.count() == 0


# --- lifecycle --------------------------------------------------------------------------


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flowhub-server")]


def test_stop_with_stalled_and_idle_clients(site):
    before = set(_server_threads())
    srv = GitHubServer(site["root"]).start()
    srv.add_fault(Fault("*/weights.bin", "stall", after_bytes=10, seconds=60))
    errors = []

    def client():
        try:
            requests.get(srv.url + site["asset"], timeout=30).content  # noqa: B018
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    idle = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    idle.request("GET", "/Owner/Repo/tree/main")
    idle.getresponse().read()  # keep-alive connection left open and idle
    deadline = time.monotonic() + 5
    while srv.count("weights.bin") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    srv.stop()
    assert time.monotonic() - start < 2.5
    thread.join(5)
    assert not thread.is_alive() and errors
    assert set(_server_threads()) - before == set()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{srv.port}/", timeout=2)
    idle.close()


def test_module_entry_point(site):
    proc = subprocess.Popen([PY, "-m", "flowhub.server", str(site["root"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        match = re.match(r"Serving (.+) at (http://127\.0\.0\.1:\d+) \(API: (\S+)\)$", line.strip())
        assert match, line
        url, api = match.group(2), match.group(3)
        assert api == url + "/api"
        assert requests.get(api + "/repos/Owner/Repo", timeout=10).json()["full_name"] == "Owner/Repo"
        assert requests.get(url + "/Owner/Repo/tree/main", timeout=10).status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert proc.stderr.read() == ""
