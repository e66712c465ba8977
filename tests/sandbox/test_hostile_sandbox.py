"""Holes a hostile repository used to get through ``Hub(sandbox=True)``, each now closed at its mechanism.

Each test runs a real sandboxed worker (or plays a forged one against the caller's real decoder) and
asserts what the attack gets: the errno of each system call it tries, what the caller's own
listeners, files, limits and memory saw. Loopback and files of the test's own only.
"""
from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest

import flowhub
from flowhub import Proxy
from flowhub.errors import HubconfError, TransferError, WorkerCrashedError, WorkerTimeoutError
from flowhub.sandbox import limits
from flowhub.worker.host.pool import get_manager
from flowhub.worker.wire import protocol, transfer

HUBCONF = r'''
"""Attacks on the sandbox; each returns the errno every attempt ended with."""
import errno, os, resource, shutil, signal, socket, subprocess, sys, time

dependencies = []


def _try(fn):
    try:
        value = fn()
        return "allowed" if value is None else f"allowed: {value}"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__


def unix_socket(path):
    """Reach a listener the caller's user holds under a folder the sandbox cannot read."""
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"ping")
    return {"connect": _try(connect), "abstract": _try(lambda: socket.socket(socket.AF_UNIX).connect("\0flowhub-x")),
            "socketpair": _try(lambda: [s.close() for s in socket.socketpair()] and None)}


def other_processes(caller, victim, cache_file):
    """Limits, /proc views and file times of processes and files outside the sandbox."""
    return {
        "prlimit_caller": _try(lambda: resource.prlimit(caller, resource.RLIMIT_CPU, (1, 1))),
        "prlimit_victim": _try(lambda: resource.prlimit(victim, resource.RLIMIT_NOFILE, (5, 5))),
        "prlimit_self": _try(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE))),
        "cmdline": _try(lambda: open(f"/proc/{caller}/cmdline", "rb").read() and None),
        "status": _try(lambda: open(f"/proc/{caller}/status").read() and None),
        "fds": _try(lambda: os.listdir(f"/proc/{caller}/fd") and None),
        "kill": _try(lambda: os.kill(caller, 0)),
        "utime_cache": _try(lambda: os.utime(cache_file, (0, 0))),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "own_pid": os.getpid(),
    }


def leave_sleeper():
    """A grandchild that detaches and would outlive everyone if it could."""
    if os.fork() == 0:
        if os.fork() == 0:
            while True:
                time.sleep(0.2)
        os._exit(0)
    return os.getpid()


def programs(scratch_binary):
    """Run programs: subprocess, a dropped copy of a binary, the dynamic loader, a memfd."""
    shutil.copy("/bin/true", scratch_binary)
    os.chmod(scratch_binary, 0o755)
    def memfd_exec():
        fd = os.memfd_create("x")
        with open("/bin/true", "rb") as f:
            os.write(fd, f.read())
        os.execve(f"/proc/self/fd/{fd}", ["x"], {})
    loaders = [p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1") if os.path.exists(p)]
    return {"subprocess": _try(lambda: subprocess.run(["/bin/true"]).returncode),
            "dropped": _try(lambda: os.execv(scratch_binary, [scratch_binary])),
            "ld_so": _try(lambda: os.execv(loaders[0], [loaders[0], "/bin/true"])),
            "memfd": _try(memfd_exec)}


def spin():
    while True:
        pass


def hang_at_call():
    time.sleep(3600)


def cpu_limit():
    return resource.getrlimit(resource.RLIMIT_CPU)


def memfd_hog(chunk_mib=256, count=8):
    """Fill memfds through write() only: no RSS, no mapping, just descriptors."""
    fds = []
    block = b"\1" * (chunk_mib << 20)
    for _ in range(count):
        fd = os.memfd_create("hog")
        os.write(fd, block)
        fds.append(fd)
    time.sleep(30)
    return len(fds)


def fill_scratch(mib):
    path = os.path.join(os.environ["TMPDIR"], "fill")
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(b"\0" * (1 << 20))
    return os.path.getsize(path)


def flood(mib=20):
    line = ("x" * 1023 + "\n")
    for _ in range(mib * 1024):
        sys.stdout.write(line)
    sys.stdout.write("\x1b]0;pwned-title\x07\x1b[2J done\n")
    sys.stdout.flush()
    return "flooded"


def rewrite_log():
    """Truncate and rewrite what fd 1 is, if it is the caller's log."""
    out = {"ftruncate": _try(lambda: os.ftruncate(1, 0)), "lseek": _try(lambda: os.lseek(1, 0, 0) and None)}
    os.write(1, b"FORGED\n")
    return out


def fetch_many(base, names):
    import oneflow.hub
    got = []
    for name in names:
        try:
            oneflow.hub.download_url_to_file(f"{base}/{name}", os.path.join(os.environ["TMPDIR"], name), progress=False)
            got.append(name)
        except Exception as exc:
            got.append(f"{type(exc).__name__}: {exc}")
    return got


def bomb(url):
    import oneflow.hub
    try:
        oneflow.hub.load_state_dict_from_url(url, progress=False)
        return "extracted"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def exits(code):
    raise SystemExit(code)


def interrupts():
    raise KeyboardInterrupt


def benign():
    import oneflow as flow
    return flow.nn.Linear(2, 2)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('FLOWHUB_TEST_MARKER', '/nonexistent/x')}",))


MARKER = ""


def trap(marker):
    """Returns an object whose unpickling runs a command (in whoever unpickles it)."""
    os.environ["FLOWHUB_TEST_MARKER"] = marker
    return {"payload": _Boom()}
'''


@pytest.fixture
def repo(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "hubconf.py").write_text(HUBCONF)
    return str(folder)


def _hub(**kwargs) -> flowhub.Hub:
    return flowhub.Hub(sandbox=True, **kwargs)


def _tree(pid: int) -> list:
    return limits.tree(pid)


def _all_gone(pids, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]:
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except OSError:
        return ""


# -- 1: unix sockets ---------------------------------------------------------------------------------
def test_no_unix_socket_with_a_path_is_reachable(repo, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(private / "agent.sock"))
    listener.listen(1)
    listener.settimeout(0)
    result = _hub().load(repo, "unix_socket", str(private / "agent.sock"), source="local")
    assert result["connect"] == "EPERM" and result["abstract"] == "EPERM"
    assert result["socketpair"] == "allowed"
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()


# -- 2: other processes, their limits, /proc, file times ------------------------------------------------
def test_other_processes_cannot_be_named_limited_or_read(repo, tmp_path):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    cache_file = tmp_path / "hub" / "checkpoints" / "trusted.bin"
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"weights")
    mtime = cache_file.stat().st_mtime_ns
    before_caller = resource.getrlimit(resource.RLIMIT_CPU)
    try:
        result = _hub(hub_dir=str(tmp_path / "hub")).load(repo, "other_processes", os.getpid(), victim.pid,
                                                           str(cache_file), source="local")
        assert result["prlimit_caller"] in ("EPERM", "ESRCH") and result["prlimit_victim"] in ("EPERM", "ESRCH")
        assert result["prlimit_self"] == "allowed"
        for name in ("cmdline", "status", "fds"):
            assert result[name] == "ENOENT", (name, result[name])
        assert result["kill"] == "ESRCH"
        assert result["utime_cache"] == "EROFS"
        assert result["own_pid"] == 1 and result["pids"] == [1]  # its own PID namespace and /proc
        assert resource.getrlimit(resource.RLIMIT_CPU) == before_caller
        with open(f"/proc/{victim.pid}/limits") as f:
            assert "Max open files            5 " not in f.read()
        assert cache_file.stat().st_mtime_ns == mtime
    finally:
        victim.kill()
        victim.wait()


CALLER = textwrap.dedent('''
    import json, os, sys, time
    import flowhub
    from flowhub.sandbox import limits
    from flowhub.worker.host.pool import get_manager
    repo = sys.argv[1]
    flowhub.Hub(sandbox=True).load(repo, "leave_sleeper", source="local")
    shim = get_manager().worker_pid(f"local:{os.path.realpath(repo)}")
    time.sleep(0.5)  # the grandchild has detached by now
    zygote = get_manager().sandbox_host().zygote()
    print(json.dumps({"tree": limits.tree(shim), "zygote": zygote.pid, "shared": zygote.how == "shared"}), flush=True)
    time.sleep(60)
''')


@pytest.mark.parametrize("zygote", ["process", "shared"])
def test_nothing_outlives_a_sigkilled_caller(repo, zygote):
    """The worker, its subprocesses and a detached grandchild all die with a SIGKILLed caller; so
    does a zygote of the caller's own, while a shared service stays up for the next caller."""
    proc = subprocess.Popen([sys.executable, "-c", CALLER, repo], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, FLOWHUB_ZYGOTE=zygote))
    try:
        line = proc.stdout.readline()
        assert line, "the caller printed nothing"
        info = json.loads(line)
        assert len(info["tree"]) >= 3, info  # shim, worker, detached grandchild
        assert info["shared"] == (zygote == "shared")
        proc.kill()
        proc.wait()
        doomed = info["tree"] + ([] if info["shared"] else [info["zygote"]])
        assert _all_gone(doomed), [p for p in info["tree"] if os.path.exists(f"/proc/{p}")]
        if info["shared"]:
            assert os.path.exists(f"/proc/{info['zygote']}")
    finally:
        proc.kill()
        proc.stdout.close()


# -- 4: the sandbox's default mode -----------------------------------------------------------------------
def test_sandbox_defaults_to_proxy_and_never_unpickles_the_worker(repo, tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWHUB_MODE", raising=False)
    marker = tmp_path / "ran-in-the-caller"
    hub = _hub()
    assert hub.settings().mode == "proxy"
    model = hub.load(repo, "benign", source="local")
    assert isinstance(model, Proxy)
    trapped = hub.load(repo, "trap", str(marker), source="local")
    assert isinstance(trapped["payload"], Proxy)  # stays in the worker: never unpickled here
    assert not marker.exists()
    with pytest.warns(UserWarning, match="outside the sandbox"):
        rebuilt = _hub(mode="rebuild").load(repo, "benign", source="local")
    assert not isinstance(rebuilt, Proxy)
    monkeypatch.setenv("FLOWHUB_MODE", "rebuild")
    assert _hub().settings().mode == "rebuild"  # explicit in the environment: honoured (with the warning)


# -- 6: forged frames and payloads ------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_announced_sizes_cost_the_caller_nothing():
    import struct

    ours, theirs = socket.socketpair()
    try:
        before = _rss()
        theirs.sendall(struct.pack("!IQ", 2, 6 << 30) + b"{}")  # a 6 GiB body that never comes
        with pytest.raises(protocol.ProtocolError, match="too large"):
            protocol.recv_message(ours, time.monotonic() + 2)
    finally:
        ours.close()
        theirs.close()
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(struct.pack("!IQ", 2, 512 << 20) + b"{}" + b"x" * 100)  # within the cap, never sent
        with pytest.raises(TimeoutError):
            protocol.recv_message(ours, time.monotonic() + 0.5)
        assert _rss() - before < 64 << 20
    finally:
        ours.close()
        theirs.close()


def test_a_sparse_memfd_is_neither_accepted_for_nothing_nor_faulted_in():
    import fcntl

    fd = os.memfd_create("sparse", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 3 << 30)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, transfer.REQUIRED_SEALS)
    before = _rss()
    with pytest.raises(TransferError, match="uses only 0"):  # a None reply with 3 GiB attached
        transfer.unpack(os.dup(fd), 3 << 30, [], populate=True)
    table = [{"dtype": "uint8", "shape": [3 << 30], "offset": 0, "nbytes": 3 << 30}]
    arrays = transfer.unpack(os.dup(fd), 3 << 30, table, populate=True)  # asked for: mapped, not pre-faulted
    assert arrays[0].shape == (3 << 30,) and _rss() - before < 256 << 20
    os.close(fd)


# -- 7, 8: memory, time and CPU ---------------------------------------------------------------------------
def test_memfds_count_against_the_memory_cap(repo, monkeypatch):
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_MEMORY", "1G")
    with pytest.raises(WorkerCrashedError, match=r"(?s)watchdog.*memory.*limit of 1\.0 GiB"):
        _hub(worker_timeout=60).load(repo, "memfd_hog", source="local")


def test_a_hang_has_a_default_time_limit(repo, monkeypatch):
    monkeypatch.delenv("FLOWHUB_WORKER_TIMEOUT", raising=False)
    monkeypatch.setenv("FLOWHUB_SANDBOX_TIMEOUT", "3")
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="within 3 s"):
        _hub().load(repo, "hang_at_call", source="local")
    assert time.monotonic() - start < 30


def test_the_cpu_limit_is_real_and_reported_as_applied(repo, monkeypatch):
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_CPU", "2")
    assert tuple(_hub().load(repo, "cpu_limit", source="local")) == (2, 3)  # what the worker really runs with
    from flowhub.cli import doctor_info

    info = doctor_info()
    assert info["sandbox_limits"]["cpu"].startswith("2 s")
    assert "cpu=2 " in info["sandbox"]["details"]["limits"]
    with pytest.raises(WorkerCrashedError, match="CPU time limit"):
        _hub(worker_timeout=60).load(repo, "spin", source="local")


# -- 9: quotas ----------------------------------------------------------------------------------------------
def test_scratch_has_a_quota(repo, monkeypatch):
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_SCRATCH", "16M")
    with pytest.raises(OSError, match="No space left"):
        _hub().load(repo, "fill_scratch", 32, source="local")
    assert _hub().load(repo, "fill_scratch", 8, source="local") == 8 << 20


def test_downloads_per_call_and_zip_bombs_are_bounded(gh, hub_root, repo, tmp_path, monkeypatch):
    assets = hub_root / "someone" / "files" / "releases" / "download" / "v1"
    assets.mkdir(parents=True)
    for name in ("a.bin", "b.bin", "c.bin"):
        (assets / name).write_bytes(os.urandom(1000))
    with zipfile.ZipFile(assets / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as z:  # 64 MiB of zeros in ~64 KiB
        z.writestr("bomb/pickled_data", b"\0" * (64 << 20))
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_DOWNLOADS", "2")
    hub = _hub(hub_dir=str(tmp_path / "hub"))
    base = f"{gh.url}/someone/files/releases/download/v1"
    got = hub.load(repo, "fetch_many", base, ["a.bin", "b.bin", "c.bin"], source="local")
    assert got[:2] == ["a.bin", "b.bin"] and got[2].startswith("PermissionError") and "2 downloads" in got[2]
    assert hub.load(repo, "fetch_many", base, ["c.bin"], source="local") == ["c.bin"]  # a new call, a new quota
    monkeypatch.setenv("FLOWHUB_SANDBOX_MAX_DOWNLOAD_BYTES", "1500")  # bytes, counted as they stream
    got = hub.load(repo, "fetch_many", base, ["a.bin", "b.bin"], source="local")
    assert got[0] == "a.bin" and got[1].startswith("DownloadTooLargeError") and "500 bytes" in got[1], got
    monkeypatch.delenv("FLOWHUB_SANDBOX_MAX_DOWNLOAD_BYTES")
    outcome = hub.load(repo, "bomb", f"{base}/bomb.zip", source="local")
    assert "expand" in outcome and "refusing" in outcome, outcome
    sandboxed = tmp_path / "hub" / "checkpoints" / ".sandboxed"
    assert not (sandboxed / "bomb.zip.extracted").exists()
    from flowhub.cache.inventory import scan

    assert any(e.name.startswith(".sandboxed/") for e in scan(str(tmp_path / "hub")))  # shown in cache ls/prune


# -- 10: output ------------------------------------------------------------------------------------------------
def test_output_is_relayed_prefixed_sanitised_and_capped(repo, capsys):
    assert _hub().load(repo, "flood", 20, source="local") == "flooded"
    time.sleep(0.5)  # the relay thread catches up
    out = capsys.readouterr().out
    assert len(out) < 2 << 20, len(out)
    assert "FLOWHUB_SANDBOX_MAX_OUTPUT" in out and out.splitlines()[0].startswith("[")
    assert "\x1b" not in out


LOGGED_CALLER = textwrap.dedent('''
    import sys, time
    import flowhub
    print("caller line 1", flush=True)
    result = flowhub.Hub(sandbox=True).load(sys.argv[1], "rewrite_log", source="local")
    time.sleep(0.5)
    print("caller line 2", result, flush=True)
''')


def test_a_worker_cannot_rewrite_the_callers_log(repo, tmp_path):
    log = tmp_path / "caller.log"
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-c", LOGGED_CALLER, repo], stdout=out, stderr=subprocess.STDOUT,
                       timeout=120, check=True)
    text = log.read_text()
    assert text.index("caller line 1") < text.index("caller line 2")
    assert "ESPIPE" in text and "EINVAL" in text  # fd 1 is a pipe: no truncating, no seeking
    assert "] FORGED" in text and "\nFORGED" not in text  # relayed with its prefix, not written raw


# -- 11: programs -----------------------------------------------------------------------------------------------
def test_no_program_runs(repo):
    result = _hub().load(repo, "programs", "/proc/self/cwd/true-copy", source="local")
    for how in ("subprocess", "dropped", "ld_so", "memfd"):
        assert result[how] == "EPERM", (how, result[how])


# -- 14: a hubconf's SystemExit / KeyboardInterrupt ------------------------------------------------------------
@pytest.mark.parametrize("sandbox", [False, True], ids=["worker", "sandboxed"])
@pytest.mark.parametrize("mode", ["rebuild", "proxy"])
def test_remote_exit_and_interrupt_are_clear_errors(repo, sandbox, mode):
    hub = flowhub.Hub(sandbox=sandbox, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(HubconfError, match=r"'exits'.*SystemExit: 3"):
            hub.load(repo, "exits", 3, source="local")
        with pytest.raises(HubconfError, match=r"'interrupts'.*KeyboardInterrupt"):
            hub.load(repo, "interrupts", source="local")
        pid = get_manager().worker_pid(f"local:{os.path.realpath(repo)}")
        assert hub.load(repo, "benign", source="local") is not None
    assert get_manager().worker_pid(f"local:{os.path.realpath(repo)}") == pid  # the same worker goes on
