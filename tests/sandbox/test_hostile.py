"""Hostile repositories and checkpoints against sandboxed workers (``Hub(sandbox=True)``).

Real processes, real sockets, loopback only: the network targets are a TCP listener on 127.0.0.1 and
a UDP "resolver" on 127.0.0.2 that this test owns (each must receive nothing), and weights come from
the loopback GitHub server. The caller holds a ``GITHUB_TOKEN`` and a ``$HOME`` with a 0600 secret.

Every attempt must be denied or contained: the worker cannot reach the network, read the token
(environment, its own memory, the caller's ``/proc/<pid>/environ``) or the secret, write outside its
scratch folder (also from subprocesses), and a fork bomb, a memory hog or a spinning worker is ended
with a clear error and nothing left behind. Checkpoints loaded with ``weights_only=True`` run their
pickle in a one-shot sandboxed worker; a payload that forges the reply or smuggles a pickle is
rejected by the caller, and nothing of it runs in the caller. Afterwards the caller works: a benign
repository in the same sandbox gives correct outputs in rebuild and proxy mode.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import secrets
import select
import socket
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub.errors import (HTTPStatusError, TransferError, UntrustedRepositoryError, WeightsOnlyError, WorkerCrashedError,
                            WorkerTimeoutError)
from flowhub.sandbox import limits
from flowhub.worker.host.pool import get_manager
from flowhub.worker.wire import transfer
from flowhub.worker.host import weights_only

from conftest import make_repo

TOKEN_PREFIX = "ghp_flowhubHostile"
DENIED = ("EACCES", "EPERM", "ENETUNREACH", "EAFNOSUPPORT", "ENOENT", "EROFS", "ECONNREFUSED")

HOSTILE = r'''
"""A repository that tries everything a sandboxed worker must not be able to do."""
import errno, hashlib, json, os, socket, subprocess, sys, time
import numpy as np
import oneflow as flow

dependencies = ["oneflow"]


def _attempt(fn):
    try:
        value = fn()
        return "allowed" if value is None else f"allowed: {value}"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _write(path):
    with open(path, "w") as f:
        f.write("pwned")


def _read(path):
    with open(path, "rb") as f:
        return len(f.read())


IMPORT_TIME = {"write_repo": _attempt(lambda: _write(os.path.join(os.path.dirname(__file__), "pwned-at-import")))}


def network(cfg):
    """Reach the caller's listener, another loopback host, a resolver; other socket families."""
    def udp(payload):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(payload, ("127.0.0.2", cfg["udp_port"]))
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
    import urllib.request
    return {
        "tcp_caller": _attempt(lambda: socket.create_connection(("127.0.0.1", cfg["tcp_port"]), timeout=2).close()),
        "tcp_other_host": _attempt(lambda: socket.create_connection(("127.0.0.2", cfg["tcp_port"]), timeout=2).close()),
        "udp_dns_query": _attempt(lambda: udp(query)),
        "inet6": _attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
        "packet": _attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()),
        "netlink": _attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()),
        "urlopen": _attempt(lambda: urllib.request.urlopen(f"http://127.0.0.1:{cfg['tcp_port']}/", timeout=2)),
        "resolve_localhost": _attempt(lambda: socket.getaddrinfo("localhost", 80) and None),
    }


def _scan_memory(prefix, suffix_sha256, suffix_len):
    """How often ``prefix`` followed by the secret suffix (known only by its hash) is in our memory."""
    hits = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if not parts[1].startswith("rw") or (len(parts) > 5 and not parts[5].startswith("[")):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if end - start > 1 << 29:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            i = data.find(prefix)
            while i >= 0:
                tail = data[i + len(prefix): i + len(prefix) + suffix_len]
                hits += hashlib.sha256(tail).hexdigest() == suffix_sha256
                i = data.find(prefix, i + 1)
    return hits


def secrets(cfg):
    """Look for the caller's token and secret file everywhere a worker could."""
    import flowhub.context
    canary = cfg["canary_prefix"] + cfg["canary_suffix"]  # positive control for the memory scan
    token_in = lambda data: cfg["token_prefix"].encode() in data
    with open("/proc/self/environ", "rb") as f:
        own_environ = token_in(f.read())
    import inspect
    wire = flowhub.context.current().settings.to_wire()  # the settings of the caller's call
    hub = flowhub.Hub(**{k: v for k, v in wire.items() if k in inspect.signature(flowhub.Hub).parameters})
    return {
        "env_token": os.environ.get("GITHUB_TOKEN"),
        "env_has_prefix": any(cfg["token_prefix"] in v for v in os.environ.values()),
        "home": os.environ.get("HOME"),
        "proc_self_environ": own_environ,
        "caller_environ": _attempt(lambda: _read(f"/proc/{cfg['caller']}/environ")),
        "caller_mem": _attempt(lambda: _read(f"/proc/{cfg['caller']}/maps")),
        "zygote_environ": _attempt(lambda: _read(f"/proc/{os.getppid()}/environ")),
        "secret_file": _attempt(lambda: _read(cfg["secret_file"])),
        "secret_via_home": _attempt(lambda: _read(os.path.expanduser("~/.secret-token"))),
        "settings_token": hub.settings().github_token,
        "hub_dir": hub.settings().hub_dir,
        "memory_token_hits": _scan_memory(cfg["token_prefix"].encode(), cfg["token_suffix_sha256"],
                                          cfg["token_suffix_len"]),
        "memory_canary_hits": _scan_memory(cfg["canary_prefix"].encode(),
                                           hashlib.sha256(cfg["canary_suffix"].encode()).hexdigest(),
                                           len(cfg["canary_suffix"])) if canary else 0,
        "import_time": IMPORT_TIME,
        "pid": os.getpid(),
    }


def writes(cfg):
    """Write into the hub cache, the repository, the test's folder, /tmp, /dev/shm and the scratch folder."""
    out = {name: _attempt(lambda p=path: _write(os.path.join(p, "pwned"))) for name, path in cfg["targets"].items()}
    out["scratch"] = _attempt(lambda: _write(os.path.join(os.environ["TMPDIR"], "fine")))
    out["mkdir_hub"] = _attempt(lambda: os.mkdir(os.path.join(cfg["targets"]["hub_cache"], "pwned-dir")))
    out["symlink_hub"] = _attempt(lambda: os.symlink("/etc/passwd", os.path.join(cfg["targets"]["hub_cache"], "ln")))
    out["chmod"] = [_attempt(lambda p=path: os.chmod(p, 0o777)) for path in (cfg["targets"]["repo"], cfg["secret_file"])]
    return out


CHILD = r"""
import errno, json, os, socket, sys
cfg = json.loads(sys.argv[1])
def attempt(fn):
    try:
        fn(); return "allowed"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__)
def write(p):
    with open(p, "w") as f: f.write("pwned")
print(json.dumps({
    "tcp_caller": attempt(lambda: socket.create_connection(("127.0.0.1", cfg["tcp_port"]), timeout=2).close()),
    "secret_file": attempt(lambda: open(cfg["secret_file"], "rb").read()),
    "caller_environ": attempt(lambda: open(f"/proc/{cfg['caller']}/environ", "rb").read()),
    "write_outside": attempt(lambda: write(os.path.join(cfg["targets"]["tmp"], "pwned-by-child"))),
    "token": os.environ.get("GITHUB_TOKEN"),
}))
"""


def subprocesses(cfg):
    """Start a Python subprocess and a shell that try the same."""
    import json
    py = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=60)
    sh = subprocess.run(["/bin/sh", "-c", f"cat /proc/{cfg['caller']}/environ; echo x > {cfg['targets']['tmp']}/pwned-by-sh"],
                        capture_output=True, text=True, timeout=60)
    return {"python": json.loads(py.stdout) if py.returncode == 0 else py.stderr[-2000:],
            "sh_code": sh.returncode, "sh_stdout": sh.stdout, "pid": os.getpid()}


def fork_bomb(n=300):
    """Fork children that stay alive until the bomb is over."""
    hold_r, hold_w = os.pipe()
    made = 0
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            os.read(hold_r, 1)
            os._exit(0)
        made += 1
    time.sleep(30)
    return made


def hog(chunk_mib=64, total_gib=8):
    """Touch memory 64 MiB at a time."""
    chunks = []
    for _ in range(total_gib * 1024 // chunk_mib):
        chunks.append(np.ones((chunk_mib << 20) // 8))
    return len(chunks)


def huge_allocation(gib=64):
    """One allocation far beyond any limit."""
    return np.empty((gib << 30) // 8).nbytes


def spin(with_child=True):
    """Leave a spinning child process behind, then spin."""
    if with_child and os.fork() == 0:
        while True:
            pass
    while True:
        pass


def scratch_files():
    """What the worker's scratch folder holds, seen from inside."""
    return sorted(os.listdir(os.environ["TMPDIR"]))


def benign(seed=0):
    """A small model; the same seed gives the same weights anywhere."""
    flow.manual_seed(seed)
    return flow.nn.Sequential(flow.nn.Linear(6, 4), flow.nn.ReLU(), flow.nn.Linear(4, 2))
'''

# A repository served by the loopback GitHub server: fetches its weights through the caller.
GITHUB_HUBCONF = r'''
"""Weights through the caller; a direct download attempt."""
import errno, os, socket
import oneflow as flow
import oneflow.hub

dependencies = ["oneflow"]


def model(url, direct_port):
    """A linear model with downloaded weights."""
    net = flow.nn.Linear(3, 2)
    state = oneflow.hub.load_state_dict_from_url(url, progress=False)
    net.load_state_dict(state)
    try:
        socket.create_connection(("127.0.0.1", direct_port), timeout=2).close()
        direct = "allowed"
    except OSError as exc:
        direct = errno.errorcode.get(exc.errno, "?")
    try:
        oneflow.hub.load_state_dict_from_url(url.rsplit("/", 1)[0] + "/missing.zip", progress=False)
        missing = "no error"
    except Exception as exc:
        missing = f"{type(exc).__name__}: {exc}"
    try:
        oneflow.hub.load_state_dict_from_url("file:///etc/passwd", progress=False, file_name="passwd")
        scheme = "no error"
    except Exception as exc:
        scheme = f"{type(exc).__name__}: {exc}"
    return net, {"direct": direct, "missing": missing, "scheme": scheme}


def plant(url, hub_dir):
    """Have the caller download a pickle where trusted loads would find it."""
    for folder, name in ((os.path.join(hub_dir, "victim_repo_main"), "hubconf.py"), (hub_dir, "trusted_list"),
                         (os.path.join(hub_dir, "checkpoints"), "resnet50-0676ba61.pth")):
        oneflow.hub.load_state_dict_from_url(url, model_dir=folder, file_name=name, progress=False)
    return os.listdir(os.path.join(hub_dir, "checkpoints", ".sandboxed"))
'''


# -- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture
def caller(tmp_path, monkeypatch):
    """The caller's secrets and network targets: a token, a 0600 file in $HOME, a TCP listener on
    127.0.0.1 and a UDP "resolver" on 127.0.0.2, and a hostile repository."""
    suffix = secrets.token_hex(16)
    token = TOKEN_PREFIX + suffix
    monkeypatch.setenv("GITHUB_TOKEN", token)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".secret-token").write_text(token)
    (home / ".secret-token").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HOSTILE)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.2", 0))
    hub_dir = tmp_path / "oneflow_home" / "hub"
    cfg = {"tcp_port": tcp.getsockname()[1], "udp_port": udp.getsockname()[1], "caller": os.getpid(),
           "secret_file": str(home / ".secret-token"), "token_prefix": TOKEN_PREFIX,
           "token_suffix_sha256": hashlib.sha256(suffix.encode()).hexdigest(), "token_suffix_len": len(suffix),
           "canary_prefix": "flowhubCanary", "canary_suffix": secrets.token_hex(8),
           "targets": {"hub_cache": str(hub_dir), "repo": str(repo), "tmp": str(tmp_path), "slash_tmp": "/tmp",
                       "dev_shm": "/dev/shm"}}
    yield {"cfg": cfg, "repo": str(repo), "tmp": tmp_path, "tcp": tcp, "udp": udp, "hub_dir": hub_dir}
    tcp.close()
    udp.close()


def _hub(**kwargs) -> flowhub.Hub:
    return flowhub.Hub(sandbox=True, **kwargs)


def _nothing_reached(c) -> None:
    assert not select.select([c["tcp"]], [], [], 0)[0], "the caller's TCP listener received a connection"
    c["udp"].setblocking(False)
    with pytest.raises(BlockingIOError):
        c["udp"].recv(4096)


def _group(pid: int) -> list:
    """Processes still in ``pid``'s process group (a sandboxed worker leads one)."""
    return [p for p, (_, group, _) in limits._processes().items() if group == pid]


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group(pid) and not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def _worker_pid(repo: str) -> int:
    pid = get_manager().worker_pid(f"local:{os.path.realpath(repo)}")
    assert pid is not None
    return pid


def _still_sound(c) -> None:
    """The next call in the same sandbox works and gives the right weights."""
    flow.manual_seed(3)
    expected = flow.nn.Sequential(flow.nn.Linear(6, 4), flow.nn.ReLU(), flow.nn.Linear(4, 2))
    model = _hub().load(c["repo"], "benign", 3, source="local")
    for (name, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name


# -- hubconfs ------------------------------------------------------------------------------------------
def test_network_is_closed_and_nothing_reaches_the_callers_sockets(caller):
    result = _hub().load(caller["repo"], "network", caller["cfg"], source="local")
    for name in ("tcp_caller", "tcp_other_host", "udp_dns_query", "inet6", "packet", "netlink"):
        assert result[name] in DENIED, (name, result[name])
    assert "allowed" not in result["urlopen"]
    _nothing_reached(caller)


def test_token_and_secrets_are_out_of_reach(caller):
    result = _hub().load(caller["repo"], "secrets", caller["cfg"], source="local")
    assert result["env_token"] is None and not result["env_has_prefix"] and not result["proc_self_environ"]
    assert result["settings_token"] is None
    assert result["memory_canary_hits"] >= 1, "the memory scan itself does not work"
    assert result["memory_token_hits"] == 0, "the token is somewhere in the worker's memory"
    for name in ("caller_environ", "caller_mem", "zygote_environ", "secret_file"):
        assert result[name] in DENIED, (name, result[name])
    assert result["secret_via_home"] == "ENOENT"  # HOME is the worker's scratch folder
    assert result["home"] != os.environ["HOME"] and result["hub_dir"] == str(caller["hub_dir"])
    assert result["import_time"]["write_repo"] in DENIED
    assert not os.path.exists(os.path.join(caller["repo"], "pwned-at-import"))


def test_writes_land_only_in_the_scratch_folder_which_goes_with_the_worker(caller):
    hub = _hub()
    result = hub.load(caller["repo"], "writes", caller["cfg"], source="local")
    assert result.pop("scratch") == "allowed"
    result.pop("chmod")  # "succeeds" but changes nothing (Landlock does not cover metadata; seccomp ignores it)
    assert oct(os.stat(caller["repo"]).st_mode & 0o777) != "0o777"
    assert os.stat(caller["cfg"]["secret_file"]).st_mode & 0o777 == 0o600
    for name, outcome in result.items():
        assert outcome in DENIED, (name, outcome)
    for path in caller["cfg"]["targets"].values():
        assert not os.path.exists(os.path.join(path, "pwned"))
    assert not os.path.lexists(caller["hub_dir"] / "ln") and not (caller["hub_dir"] / "pwned-dir").exists()
    scratch = hub.load(caller["repo"], "secrets", caller["cfg"], source="local")["home"]
    assert "fine" in hub.load(caller["repo"], "scratch_files", source="local")  # a tmpfs only the worker sees
    get_manager().shutdown()
    assert not os.path.exists(scratch), "the scratch folder outlived its worker"


def test_no_program_runs_in_the_sandbox(caller):
    with pytest.raises(PermissionError):  # execve is denied: subprocess.run fails in the hubconf
        _hub().load(caller["repo"], "subprocesses", caller["cfg"], source="local")
    assert not (caller["tmp"] / "pwned-by-child").exists() and not (caller["tmp"] / "pwned-by-sh").exists()
    _nothing_reached(caller)


def test_fork_bomb_is_killed_with_every_process(caller, monkeypatch):
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_PROCESSES", "16")
    hub = _hub(worker_timeout=60)
    hub.load(caller["repo"], "benign", source="local")
    pid = _worker_pid(caller["repo"])
    with pytest.raises(WorkerCrashedError, match=r"(?s)SIGKILL.*watchdog.*processes.*FLOWHUB_SANDBOX_MAX_PROCESSES"):
        hub.load(caller["repo"], "fork_bomb", source="local")
    assert _gone(pid), f"left behind: {_group(pid)}"
    _still_sound(caller)


def test_memory_hog_is_stopped_at_the_cap(caller, monkeypatch):
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_MEMORY", "1G")
    hub = _hub(worker_timeout=60)
    with pytest.raises(MemoryError):  # RLIMIT_DATA at the cap: one huge allocation fails inside
        hub.load(caller["repo"], "huge_allocation", source="local")
    with pytest.raises(MemoryError):  # and so does touching memory bit by bit, before the watchdog must act
        hub.load(caller["repo"], "hog", source="local")
    _still_sound(caller)


def test_spinning_worker_and_its_subprocess_are_ended(caller):
    hub = _hub(worker_timeout=2)
    hub.load(caller["repo"], "benign", source="local")
    pid = _worker_pid(caller["repo"])
    with pytest.raises(WorkerTimeoutError, match="did not finish within 2 s"):
        hub.load(caller["repo"], "spin", source="local")
    assert _gone(pid), f"left behind: {_group(pid)}"
    _still_sound(caller)


def test_benign_repo_in_the_sandbox_rebuild_and_proxy(caller):
    flow.manual_seed(7)
    expected = flow.nn.Sequential(flow.nn.Linear(6, 4), flow.nn.ReLU(), flow.nn.Linear(4, 2))
    x = flow.randn(5, 6)
    rebuilt = _hub().load(caller["repo"], "benign", 7, source="local")
    assert np.array_equal(rebuilt(x).numpy(), expected(x).numpy())
    proxy = _hub(mode="proxy").load(caller["repo"], "benign", 7, source="local")
    assert not isinstance(proxy, flow.nn.Module)
    assert np.allclose(proxy(x).numpy(), expected(x).numpy(), atol=1e-6)
    assert _hub(mode="proxy").load(caller["repo"], "network", caller["cfg"], source="local")["tcp_caller"] in DENIED
    _nothing_reached(caller)


FRESH_CALLER = r"""
import json, os, sys
import flowhub
from flowhub.worker.host.pool import get_manager
from flowhub.worker.host import launch
repo = sys.argv[1]
small = launch._can_fork_zygote()  # a plain zygote would be forked from this caller now
boxed = flowhub.Hub(sandbox=True).load(repo, "benign", 1, source="local")
plain = flowhub.Hub().load(repo, "benign", 1, source="local")
manager = get_manager()
host = manager.sandbox_host()
with open(f"/proc/{host.zygote_pid()}/environ", "rb") as f:
    environ = f.read()
with open(f"/proc/{manager.zygote_pid}/environ", "rb") as f:
    plain_environ = f.read()
print(json.dumps({"small_caller": small, "sandbox_zygote": host._zygote.how,
                  "token_in_sandbox_zygote": os.environ["GITHUB_TOKEN"].encode() in environ,
                  "token_in_shared_service": manager.zygote_started_by == "shared"
                                             and os.environ["GITHUB_TOKEN"].encode() in plain_environ,
                  "same": all((a == b).all().item() for a, b in zip(boxed.state_dict().values(),
                                                                     plain.state_dict().values()))}))
"""


@pytest.mark.parametrize("zygote", ["process", "shared"])
def test_sandbox_zygote_is_always_spawned_with_a_scrubbed_environment(caller, zygote):
    """Never forked from the caller, never given its token: a spawned zygote of the caller's own
    (``FLOWHUB_ZYGOTE=process``) or the sandbox-flavour service; the plain service has no token either."""
    proc = subprocess.run([sys.executable, "-c", FRESH_CALLER, caller["repo"]], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, FLOWHUB_ZYGOTE=zygote))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"small_caller": True, "sandbox_zygote": "spawn" if zygote == "process" else "shared",
                      "token_in_sandbox_zygote": False, "token_in_shared_service": False, "same": True}


def test_sandbox_refuses_inprocess_mode(caller):
    with pytest.raises(ValueError, match="needs a worker"):
        _hub(mode="inprocess").load(caller["repo"], "benign", source="local")


def test_github_repo_weights_come_through_the_caller_and_trust(gh, hub_root, caller, tmp_path):
    make_repo(hub_root, "hostile", "evil", {"hubconf.py": GITHUB_HUBCONF})
    flow.manual_seed(0)
    state = {"weight": flow.randn(2, 3), "bias": flow.randn(2)}
    folder = tmp_path / "lin"
    flow.save(state, str(folder))
    assets = hub_root / "hostile" / "evil" / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(assets / "lin.zip", "w") as z:
        for name in sorted(os.listdir(folder)):
            path = folder / name
            if path.is_dir():
                for sub in sorted(os.listdir(path)):
                    z.write(path / sub, f"lin/{name}/{sub}")
            else:
                z.write(path, f"lin/{name}")
    url = f"{gh.url}/hostile/evil/releases/download/v1/lin.zip"

    # trust: without a sandbox the reference's rules (no terminal: "check" refuses), with one no prompt
    with pytest.raises(UntrustedRepositoryError):
        flowhub.Hub().list("hostile/evil", trust_repo="check")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _hub().list("hostile/evil") == ["model", "plant"]
        assert _hub().list("hostile/evil", trust_repo="check") == ["model", "plant"]
        assert "linear model" in _hub().help("hostile/evil", "model")
    assert not [w for w in caught if "untrusted" in str(w.message)]
    # its folder now exists, but was fetched without trust: the legacy rule does not make it trusted
    with pytest.raises(UntrustedRepositoryError):
        flowhub.Hub().list("hostile/evil", trust_repo="check")
    with pytest.warns(UserWarning, match="untrusted repository"):  # rebuild mode runs repo code here
        with pytest.raises(HTTPStatusError, match="404"):  # a download error reaches the hubconf, then here
            _hub(mode="rebuild").load("hostile/evil", "model", url.rsplit("/", 1)[0] + "/none.zip", 9)

    with warnings.catch_warnings(record=True) as caught:  # proxy mode: nothing comes back as code
        warnings.simplefilter("always")
        proxied, report = _hub(mode="proxy").load("hostile/evil", "model", url, caller["cfg"]["tcp_port"])
    assert not [w for w in caught if "untrusted" in str(w.message)]
    assert np.array_equal(proxied.weight.numpy(), state["weight"].numpy()) and report["direct"] in DENIED

    gh.clear_log()
    hub = _hub()
    net, report = hub.load("hostile/evil", "model", url, caller["cfg"]["tcp_port"], trust_repo=True)
    assert np.array_equal(net.weight.numpy(), state["weight"].numpy())
    assert np.array_equal(net.bias.numpy(), state["bias"].numpy())
    assert report["direct"] in DENIED
    assert "HTTPStatusError" in report["missing"] and "404" in report["missing"]
    assert "ValueError" in report["scheme"] and "http(s)" in report["scheme"]
    sandboxed = caller["hub_dir"] / "checkpoints" / ".sandboxed"
    assert (sandboxed / "lin.zip").is_file() and (sandboxed / "lin.zip.extracted").is_dir()
    assert not (caller["hub_dir"] / "checkpoints" / "lin.zip").exists()  # apart from what trusted loads use
    assert [w["file"] for w in hub.last_provenance.weights] == ["lin.zip"]
    downloads = [r for r in gh.requests if "/releases/" in r.path]
    assert downloads and not any(r.authorized for r in downloads), "the token went with a sandboxed download"
    _nothing_reached(caller)

    # the caller's own weights-only load of the same URL: its own cache, unpickled in a sandbox
    sd = _hub().load_state_dict_from_url(url, weights_only=True)
    assert sorted(sd) == ["bias", "weight"] and np.array_equal(sd["weight"].numpy(), state["weight"].numpy())
    assert (caller["hub_dir"] / "checkpoints" / "lin.zip").is_file()
    before = gh.count("/lin.zip")
    hub.load("hostile/evil", "model", url, caller["cfg"]["tcp_port"])  # now shared with trusted loads, read-only
    assert gh.count("/lin.zip") == before

    # a hubconf cannot make the caller plant files where trusted loads look
    with pytest.warns(UserWarning, match="sandboxed downloads are cached in"):
        planted = hub.load("hostile/evil", "plant", url, str(caller["hub_dir"]))
    assert {p for p in planted if not p.endswith(".extracted")} == {
        ".flowhub", "lin.zip", "hubconf.py", "trusted_list", "resnet50-0676ba61.pth"}
    assert not (caller["hub_dir"] / "victim_repo_main").exists()
    assert not (caller["hub_dir"] / "checkpoints" / "resnet50-0676ba61.pth").exists()
    assert "hostile_evil" in (caller["hub_dir"] / "trusted_list").read_text()  # only what trust_repo=True wrote


# -- checkpoints ---------------------------------------------------------------------------------------
class _Payload:
    """Runs ``code`` wherever the checkpoint is unpickled (and unpickles to None)."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return exec, (self.code, {})


class _Object:
    def __reduce__(self):
        import collections

        return collections.Counter, ({"a": 1},)


def _checkpoint(path, *extra) -> str:
    flow.save({"w": flow.arange(12, dtype=flow.float32).reshape(3, 4), "b": flow.ones(12), "step": 5,
               "meta": {"name": "net", "sizes": [1, 2]}, **{f"x{i}": e for i, e in enumerate(extra)}}, str(path))
    return str(path)


MARKER_CODE = textwrap.dedent('''
    import os, socket
    try:
        with open({marker!r}, "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        pass
    try:
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    except OSError:
        pass
''')


def test_weights_only_runs_the_pickle_in_the_sandbox_not_here(caller, tmp_path):
    marker = tmp_path / "marker"
    path = _checkpoint(tmp_path / "ck", _Payload(MARKER_CODE.format(marker=str(marker), port=caller["cfg"]["tcp_port"])))
    sd = flowhub.load_weights(path)
    assert not marker.exists(), "the checkpoint's payload wrote outside the sandbox"
    _nothing_reached(caller)
    assert sd["x0"] is None and sd["step"] == 5 and sd["meta"] == {"name": "net", "sizes": [1, 2]}
    assert np.array_equal(sd["w"].numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    sd["w"] += 1  # writable, copy-on-write
    assert float(sd["w"].sum()) == 66 + 12
    # the same file loaded the trusting way runs the payload in this very process
    flowhub.load_weights(path, weights_only=False)
    assert marker.read_text() == str(os.getpid())


def test_weights_only_refuses_objects_with_a_clear_error(tmp_path):
    path = _checkpoint(tmp_path / "ck", _Object())
    with pytest.raises(WeightsOnlyError, match=r"collections\.Counter.*weights_only=True accepts"):
        flowhub.load_weights(path)
    with pytest.raises(FileNotFoundError):
        flowhub.load_weights(tmp_path / "missing")


#: How a checkpoint's payload rewrites the worker's reply, and what the caller must say about it.
FORGERIES = {
    "overlap": ('t = h["table"]; t[1]["offset"] = t[0]["offset"]', "overlap"),
    "out_of_range": ('h["table"][0]["offset"] = h["size"]', "outside the"),
    "object_dtype": ('h["table"][0]["dtype"] = "object"', "refused dtype"),
    "wrong_nbytes": ('h["table"][0]["shape"] = [1000, 1000]', r"x 4 B != 48 B"),
    "bad_size": ('h["size"] = -1', "bad payload size"),
    "pickle_node": ('h["value"] = {"t": "pickle", "v": PICKLE}', "unknown value node 'pickle'"),
    "bad_index": ('h["value"] = {"t": "tensor", "i": 99}', "tensor index 99"),
    "ref_node": ('h["value"] = {"t": "ref", "r": 1}', "refers to an object kept in the worker"),
    "unsealed_memfd": ('fd = os.memfd_create("x"); os.ftruncate(fd, h["size"]); fds = [fd]', "not sealed"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_replies_are_rejected_by_the_caller(tmp_path, forgery):
    marker = tmp_path / "smuggled"
    smuggled = base64.b64encode(pickle.dumps(_Payload(f"open({str(marker)!r}, 'w').write('ran')"))).decode()
    code = textwrap.dedent(f'''
        import os
        import flowhub.worker.wire.protocol as p
        PICKLE = {smuggled!r}
        original = p.send_message
        def forged(sock, h, body=b"", fds=()):
            if h.get("ok") is True:
                {FORGERIES[forgery][0]}
            return original(sock, h, body, fds)
        p.send_message = forged
    ''')
    path = _checkpoint(tmp_path / "ck", _Payload(code))
    with pytest.raises(TransferError, match=FORGERIES[forgery][1]):
        flowhub.load_weights(path)
    assert not marker.exists()
    assert sorted(flowhub.load_weights(_checkpoint(tmp_path / "ok"))) == ["b", "meta", "step", "w"]


def test_hand_made_tables_are_validated_before_any_view():
    good = {"dtype": "float32", "shape": [2, 2], "offset": 0, "nbytes": 16}
    assert transfer.validate([good], 64)
    for table, size in [
        ([dict(good, offset=56)], 64),                               # extent past the end
        ([good, dict(good, offset=8)], 64),                           # overlap
        ([dict(good, dtype="object")], 64),                           # refused dtype
        ([dict(good, nbytes=12)], 64),                                # shape x itemsize != nbytes
        ([dict(good, shape=[-2, -2])], 64),                           # negative dims
        ([dict(good, offset=2)], 64),                                 # misaligned
        ({"not": "a list"}, 64),
    ]:
        with pytest.raises(TransferError):
            transfer.validate(table, size)
    packed = transfer.pack([np.ones(4, np.float32)])
    fd = os.dup(packed.fd)
    packed.close()
    reply = {"ok": True, "size": 16, "table": [good], "value": {"t": "tensor", "i": 0}}
    assert float(weights_only.decode_reply(dict(reply), [fd], "test").sum()) == 4
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, 16)
    with pytest.raises(TransferError, match="not sealed"):
        weights_only.decode_reply(dict(reply), [unsealed], "test")
    with pytest.raises(WeightsOnlyError, match="boom"):
        weights_only.decode_reply({"ok": False, "error": {"message": "boom"}}, [], "test")


def test_spinning_checkpoint_is_ended_by_worker_timeout(tmp_path):
    path = _checkpoint(tmp_path / "ck", _Payload("while True: pass"))
    with pytest.raises(WorkerTimeoutError, match="weights-only load"):
        flowhub.Hub(worker_timeout=2).load_weights(path)
    sd = flowhub.load_weights(_checkpoint(tmp_path / "ok"))
    assert sd["step"] == 5


def test_no_processes_are_left_behind():
    manager = get_manager()
    pids = manager.active_pids()
    manager.shutdown()
    for pid in pids:
        assert _gone(pid), pid
    assert not manager.active_pids()


def test_doctor_reports_the_sandbox_of_this_machine(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowhub", "--hub-dir", str(tmp_path / "hub"), "doctor", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["hub_dir"] == str(tmp_path / "hub") and info["oneflow"] == "0.9.0" and info["python"]
    assert set(info["sandbox"]["mechanisms"]) == {"environment", "limits", "namespaces", "privileges", "landlock",
                                                  "seccomp"}
    assert info["sandbox"]["checks"]["write outside scratch"].startswith("denied")
    text = subprocess.run([sys.executable, "-m", "flowhub", "doctor"], capture_output=True, text=True, timeout=60)
    assert text.returncode == 0 and f"sandbox: {info['sandbox']['strength']}" in text.stdout


FETCH_HUBCONF = r'''
import oneflow.hub


def fetch(url):
    try:
        return sorted(oneflow.hub.load_state_dict_from_url(url, progress=False))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
'''


def test_caller_fetches_only_from_the_configured_endpoints(gh, hub_root, example, tmp_path, monkeypatch):
    from flowhub.server import GitHubServer

    repo = tmp_path / "fetcher"
    repo.mkdir()
    (repo / "hubconf.py").write_text(FETCH_HUBCONF)
    asset = f"flowhub-examples/tiny-models/releases/download/v0.1/{example['weights']['v0.1']['tinymlp']}"
    with GitHubServer(hub_root) as other:  # another host:port than the configured endpoints
        assert _hub(mode="proxy").load(str(repo), "fetch", f"{gh.url}/{asset}", source="local") == [
            "fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
        refused = _hub(mode="proxy").load(str(repo), "fetch", f"{other.url}/{asset}", source="local")
        assert refused.startswith("PermissionError") and "FLOWHUB_SANDBOX_ALLOWED_HOSTS" in refused
        assert other.requests == []
        monkeypatch.setenv("FLOWHUB_SANDBOX_ALLOWED_HOSTS", f"example.invalid, 127.0.0.1:{other.port}")
        # allowed now (the host check comes before the by-name cache, which already holds this file)
        assert len(_hub(mode="proxy").load(str(repo), "fetch", f"{other.url}/{asset}", source="local")) == 4
