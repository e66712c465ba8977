"""The worker sandbox, tested the way workers use it.

The pytest process has threads, so nothing here sandboxes it. One fresh subprocess plays the zygote:
it imports flowhub and oneflow (whose runtime threads then exist), runs an op, and forks one child
per scenario. Each single-threaded child calls ``flowhub.sandbox.apply`` and then tries hostile
actions against things the subprocess set up (a TCP listener on 127.0.0.1, a UDP "resolver" on
127.0.0.2, a secret in its own environment, a 0600 token file in a fake $HOME, a folder outside
scratch), writing one JSON line per result to a pipe. Traffic never leaves loopback: the network
targets are the subprocess's own sockets. Two more subprocesses cover a spawned worker (sandbox
before ``import oneflow``) and ``probe()``.

Subprocesses are allowed in the sandbox by default (they inherit every restriction: the test shows a
``cat`` of the caller's environ failing), and ``allow_subprocesses=False`` forbids them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from flowhub.sandbox import MECHANISMS, SandboxPolicy, SandboxReport, format_report

SECRET = "ghp_flowhubSandboxTestSecret0123456789"
CHILD_TIMEOUT = 30

ZYGOTE = textwrap.dedent(r'''
    import ctypes, errno, json, os, select, signal, socket, subprocess, sys, time
    cfg = json.loads(sys.argv[1])
    import flowhub
    import numpy as np
    import oneflow as flow
    import flowhub.sandbox as sb
    from flowhub.sandbox import limits
    from flowhub.sandbox._common import libc

    sb.prepare()
    ZYGOTE_PID = os.getpid()
    flow.nn.Conv2d(3, 4, 3)(flow.randn(1, 3, 8, 8)).numpy()   # the runtime is up, with its threads
    out = {"zygote_threads": sb.thread_count(), "uid": os.getuid()}
    try:
        sb.apply(sb.SandboxPolicy(scratch=cfg["scratch"] + "-mt"))
        out["multithreaded"] = "applied"
    except sb.SandboxError as exc:
        out["multithreaded"] = "SandboxError: " + str(exc)
    out["zygote_env_intact"] = os.environ.get("GITHUB_TOKEN") == cfg["secret"]

    tcp = socket.socket(); tcp.bind(("127.0.0.1", 0)); tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(("127.0.0.2", 0)); udp.setblocking(False)
    TCP_PORT, UDP_PORT = tcp.getsockname()[1], udp.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        FREE_PORT = probe.getsockname()[1]
    resolve = sb.seccomp.library().seccomp_syscall_resolve_name

    def attempt(fn):
        try:
            value = fn()
            return ["allowed", value]
        except OSError as exc:
            return ["denied", errno.errorcode.get(exc.errno, type(exc).__name__)]
        except MemoryError:
            return ["denied", "MemoryError"]

    def call(name, *args):
        ret = libc().syscall(ctypes.c_long(resolve(name.encode())), *[ctypes.c_long(a) for a in args])
        return "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    def write(path):
        with open(path, "w") as f:
            f.write("x")

    def read(path):
        with open(path, "rb") as f:
            return len(f.read())

    def conv():
        y = flow.nn.Conv2d(3, 8, 3, padding=1)(flow.randn(2, 3, 16, 16)).relu().sum()
        return float(y.numpy())

    def hostile(emit):
        ppid = ZYGOTE_PID  # the zygote: in its own PID namespace the worker has no parent it can name
        r = {}
        r["tcp_connect_127.0.0.1"] = attempt(lambda: socket.create_connection(("127.0.0.1", TCP_PORT), timeout=1).close())
        def udp_send(payload):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1)
                s.sendto(payload, ("127.0.0.2", UDP_PORT))
        r["udp_send_127.0.0.2"] = attempt(lambda: udp_send(b"hello"))
        dns_query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
        r["dns_query_to_fake_resolver"] = attempt(lambda: udp_send(dns_query))
        r["socket_inet6"] = attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
        r["socket_netlink"] = attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
        r["socket_packet"] = attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
        def bind(port):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1] > 0
        r["bind_port_0"] = attempt(lambda: bind(0))
        r["bind_fixed_port"] = attempt(lambda: bind(FREE_PORT))
        r["socket_unix_pair"] = attempt(lambda: [s.close() for s in socket.socketpair()] and None)
        r["token_in_os_environ"] = any(cfg["secret"] in v for v in os.environ.values())
        r["environ_keys"] = sorted(os.environ)
        r["home"] = os.environ.get("HOME")
        with open("/proc/self/environ", "rb") as f:
            r["secret_in_proc_self_environ"] = cfg["secret"].encode() in f.read()
        r["read_parent_environ"] = attempt(lambda: read(f"/proc/{ppid}/environ"))
        r["read_parent_mem_maps"] = attempt(lambda: read(f"/proc/{ppid}/maps"))
        r["read_secret_file"] = attempt(lambda: read(cfg["secret_file"]))
        r["read_secret_via_home"] = attempt(lambda: read(os.path.expanduser("~/.secret-token")))
        r["read_repo_file"] = attempt(lambda: read(os.path.join(cfg["repo"], "hubconf.py")))
        r["write_repo_file"] = attempt(lambda: write(os.path.join(cfg["repo"], f"pwned-{CURRENT}.py")))
        r["write_outside_scratch"] = attempt(lambda: write(os.path.join(cfg["outside"], f"pwned-{CURRENT}")))
        r["write_scratch"] = attempt(lambda: write(os.path.join(os.environ["TMPDIR"], "ok")))
        r["read_etc_shadow"] = attempt(lambda: read("/etc/shadow"))
        r["subprocess_true"] = attempt(lambda: subprocess.run(["/bin/true"]).returncode)
        def cat_parent():
            p = subprocess.run(["/bin/cat", f"/proc/{ppid}/environ"], capture_output=True)
            return [p.returncode, cfg["secret"].encode() in p.stdout]
        r["subprocess_cat_parent_environ"] = attempt(cat_parent)
        r["signal_parent"] = attempt(lambda: os.kill(ppid, 0))
        r["ptrace_attach_parent"] = call("ptrace", 16, ppid, 0, 0)
        r["process_vm_readv"] = call("process_vm_readv", ppid, 0, 0, 0, 0, 0)
        r["unshare_user"] = call("unshare", 0x10000000)
        r["mount"] = call("mount", 0, 0, 0, 0, 0)
        r["bpf"] = call("bpf", 0, 0, 0)
        r["keyctl"] = call("keyctl", 0, 0, 0, 0, 0)
        r["userfaultfd"] = call("userfaultfd", 0)
        r["perf_event_open"] = call("perf_event_open", 0, 0, -1, -1, 0)
        r["uid"] = os.getuid()
        pdeathsig = ctypes.c_int(0)
        libc().prctl(2, ctypes.addressof(pdeathsig), 0, 0, 0)  # PR_GET_PDEATHSIG
        r["pdeathsig"] = pdeathsig.value
        r["conv"] = attempt(conv)
        r["thread"] = attempt(lambda: __import__("threading").Thread(target=lambda: None).start())
        emit(r)

    def spin(emit):
        emit({"spinning": True})
        while True:
            pass

    def alloc_rlimit(emit):
        r = {"alloc_2gib": attempt(lambda: np.ones((2 << 30) // 8).nbytes)}
        r["conv_after"] = attempt(conv)
        emit(r)

    def alloc_forever(emit):
        chunks = []
        for i in range(64):                       # up to 4 GiB, 64 MiB at a time, every page touched
            chunks.append(np.ones((64 << 20) // 8))
            emit({"allocated_mib": 64 * (i + 1)})
        emit({"survived": True})

    def fork_bomb(emit):
        hold_r, hold_w = os.pipe()
        made, error = 0, None
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError as exc:
                error = errno.errorcode.get(exc.errno, str(exc))
                break
            if pid == 0:
                os.close(hold_w)
                os.read(hold_r, 1)                # live until the bomb is over
                os._exit(0)
            made += 1
        os.close(hold_w)
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
        emit({"forks": made, "fork_error": error})

    def try_fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    def no_subprocess(emit):
        emit({"subprocess_true": attempt(lambda: subprocess.run(["/bin/true"]).returncode),
              "os_fork": attempt(try_fork),
              "conv": attempt(conv),
              "thread": attempt(lambda: __import__("threading").Thread(target=lambda: None).start())})

    side = {}

    def threaded(emit):
        side["go"].set()
        side["thread"].join()
        emit({"other_thread_unshare": side["result"], "this_thread_unshare": call("unshare", 0x10000000),
              "conv": attempt(conv)})

    def start_side_thread():
        import threading
        side["go"] = threading.Event()
        def other():
            side["go"].wait()
            side["result"] = call("unshare", 0x10000000)
        side["thread"] = threading.Thread(target=other)
        side["thread"].start()

    def run(name, body, policy, watchdog=None, drop_to_nobody=False, with_thread=False):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:                                  # --- the worker ---
            os.close(rfd)
            global CURRENT
            CURRENT = name
            def emit(obj):
                os.write(wfd, (json.dumps(obj) + "\n").encode())
            try:
                tcp.close(); udp.close()
                if drop_to_nobody:
                    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
                    libc().prctl(4, 1, 0, 0, 0)       # PR_SET_DUMPABLE, lost by the uid change
                libc().prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG, as the zygote does
                if with_thread:
                    start_side_thread()
                emit({"threads_at_apply": sb.thread_count()})
                t0 = time.perf_counter()
                report = sb.apply(sb.SandboxPolicy(**policy), allow_threads=with_thread)
                emit({"report": report.as_dict(), "apply_ms": (time.perf_counter() - t0) * 1000})
                body(emit)
            except BaseException as exc:
                emit({"error": f"{type(exc).__name__}: {exc}"})
            os._exit(0)
        os.close(wfd)
        if watchdog is not None:
            watchdog.watch(pid)
        buf, deadline = b"", time.monotonic() + cfg["timeout"]
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                limits.kill_tree(pid)
                buf += b'{"timeout": true}\n'
                break
            chunk = os.read(rfd, 65536)
            if not chunk:
                break
            buf += chunk
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        result = {}
        for line in buf.decode().splitlines():
            if line.strip():
                result.update(json.loads(line))
        result["exit"] = ({"signal": signal.Signals(os.WTERMSIG(status)).name} if os.WIFSIGNALED(status)
                          else {"code": os.WEXITSTATUS(status)})
        for _ in range(40):                           # killed members are reaped by init: give it a moment
            left = [p for p, (_, group, _) in limits._processes().items() if group == pid]
            if not left:
                break
            time.sleep(0.05)
        result["leftover_group"] = len(left)
        try:
            os.killpg(pid, signal.SIGKILL)            # nothing must be left, but never leak a bomb
        except (ProcessLookupError, PermissionError):
            pass
        return result

    base = {"scratch": cfg["scratch"], "read_paths": (cfg["repo"],)}
    results = out["scenarios"] = {}
    results["hostile"] = run("hostile", hostile, base)
    try:
        data = udp.recv(4096)
        out["udp_received"] = data.decode(errors="replace")
    except BlockingIOError:
        out["udp_received"] = None
    try:
        conn, _ = tcp.accept() if select.select([tcp], [], [], 0)[0] else (None, None)
        out["tcp_accepted"] = conn is not None
    except OSError:
        out["tcp_accepted"] = False
    results["hostile_no_netns"] = run("hostile_no_netns", hostile, dict(base, skip_mechanisms=("namespaces",)))
    results["hostile_no_landlock"] = run("hostile_no_landlock", hostile, dict(base, skip_mechanisms=("landlock",)))
    results["threaded"] = run("threaded", threaded, base, with_thread=True)
    results["spin"] = run("spin", spin, dict(base, cpu_seconds=1))
    results["alloc_rlimit"] = run("alloc_rlimit", alloc_rlimit, dict(base, max_memory=1536 << 20))
    dog = limits.Watchdog(max_rss=768 << 20, interval=0.05).start()
    results["alloc_forever"] = run("alloc_forever", alloc_forever, dict(base, max_memory=None), watchdog=dog)
    dog.stop()
    out["memory_kills"] = [k.__dict__ for k in dog.kills]
    dog = limits.Watchdog(max_processes=32, interval=0.05).start()
    results["fork_bomb"] = run("fork_bomb", fork_bomb, dict(base, max_processes=16), watchdog=dog)
    dog.stop()
    out["process_kills"] = [k.__dict__ for k in dog.kills]
    if os.getuid() == 0:
        nobody_scratch = cfg["scratch"] + "-nobody"
        results["fork_bomb_nobody"] = run("fork_bomb_nobody", fork_bomb,
                                          dict(base, scratch=nobody_scratch, max_processes=16), drop_to_nobody=True)
    results["no_subprocess"] = run("no_subprocess", no_subprocess, dict(base, allow_subprocesses=False))
    print(json.dumps(out))
''')

SPAWNED = textwrap.dedent(r'''
    import json, os, socket, sys
    import flowhub.sandbox as sb
    cfg = json.loads(sys.argv[1])
    threads = sb.thread_count()
    report = sb.apply(sb.SandboxPolicy(scratch=cfg["scratch"], skip_mechanisms=tuple(cfg["skip"])))
    import oneflow as flow
    y = flow.nn.Conv2d(3, 4, 3)(flow.randn(1, 3, 16, 16))
    try:
        socket.create_connection(("127.0.0.1", cfg["port"]), timeout=1).close()
        connect = "allowed"
    except OSError as exc:
        connect = "denied"
    print(json.dumps({"threads_before": threads, "report": report.as_dict(), "shape": list(y.shape),
                      "connect": connect, "token": "GITHUB_TOKEN" in os.environ}))
''')


def _run_python(code: str, cfg: dict, env: dict, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1])


def _secret_env(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    token = home / ".secret-token"
    token.write_text(SECRET)
    token.chmod(0o600)
    env = dict(os.environ, GITHUB_TOKEN=SECRET, MY_SERVICE_PASSWORD=SECRET, HOME=str(home))
    return env


@pytest.fixture(scope="module")
def zygote(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sandbox")
    env = _secret_env(tmp)
    repo, outside = tmp / "repo", tmp / "outside"
    repo.mkdir()
    outside.mkdir()
    (repo / "hubconf.py").write_text("dependencies = []\n")
    cfg = {"scratch": str(tmp / "scratch"), "repo": str(repo), "outside": str(outside), "secret": SECRET,
           "secret_file": str(tmp / "home" / ".secret-token"), "timeout": CHILD_TIMEOUT}
    result = _run_python(ZYGOTE, cfg, env, timeout=240)
    result["cfg"] = cfg
    return result


def _scenario(zygote: dict, name: str) -> dict:
    result = zygote["scenarios"][name]
    assert "error" not in result, result["error"]
    assert "timeout" not in result, f"{name} timed out: {result}"
    return result


def _report(result: dict) -> SandboxReport:
    return SandboxReport.from_dict(result["report"])


def _need(report: SandboxReport, *names: str) -> None:
    for name in names:
        if not report.applied(name):
            pytest.skip(f"{name} is {report.mechanisms.get(name)} on this machine")


def test_apply_refuses_a_multithreaded_process_and_changes_nothing(zygote):
    assert zygote["zygote_threads"] > 1
    assert zygote["multithreaded"].startswith("SandboxError"), zygote["multithreaded"]
    assert zygote["zygote_env_intact"]


def test_forked_worker_is_single_threaded_and_fully_sandboxed(zygote):
    result = _scenario(zygote, "hostile")
    assert result["threads_at_apply"] == 1
    report = _report(result)
    assert list(report.mechanisms) == list(MECHANISMS)
    for name, status in report.mechanisms.items():
        assert status.split(":")[0] in ("applied", "skipped", "unavailable"), (name, status)
    if all(report.applied(n) for n in ("environment", "landlock", "seccomp")) and (
            report.applied("namespaces") or report.protections["network"].startswith("landlock")):
        assert report.strength() == "strong", format_report(report)
    assert result["apply_ms"] > 0  # how long it takes is scripts/bench_sandbox.py's to say, not a test's
    assert result["pdeathsig"] == 9  # the zygote's PR_SET_PDEATHSIG survives the namespace and capset


@pytest.mark.parametrize("scenario", ["hostile", "hostile_no_netns"])
def test_network_is_denied(zygote, scenario):
    """With a network namespace, and without one (Landlock for TCP, seccomp for UDP)."""
    result = _scenario(zygote, scenario)
    report = _report(result)
    if report.protections["network"].startswith(("none", "partial")):
        pytest.skip(f"no network isolation here: {report.protections['network']}")
    if scenario == "hostile_no_netns":
        assert report.mechanisms["namespaces"] == "skipped: excluded by the policy"
        assert report.protections["network"].startswith("landlock (TCP) + seccomp")
    assert result["tcp_connect_127.0.0.1"][0] == "denied"
    assert result["udp_send_127.0.0.2"][0] == "denied"
    assert result["dns_query_to_fake_resolver"][0] == "denied"
    assert zygote["udp_received"] is None and not zygote["tcp_accepted"]
    assert result["bind_port_0"] == ["allowed", True]  # what OneFlow's startup needs
    if report.applied("landlock"):
        assert result["bind_fixed_port"] == ["denied", "EACCES"]
    if report.applied("seccomp"):
        for family in ("socket_inet6", "socket_netlink", "socket_packet"):
            assert result[family] == ["denied", "EAFNOSUPPORT"], family
    assert result["socket_unix_pair"][0] == "allowed"
    assert result["conv"][0] == "allowed"


def test_threaded_process_gets_what_still_works(zygote):
    result = _scenario(zygote, "threaded")
    report = _report(result)
    assert result["threads_at_apply"] == 2
    for name in ("namespaces", "landlock"):
        assert report.mechanisms[name].startswith("unavailable: the process has 2 threads")
    if report.applied("seccomp"):  # TSYNC: the filter reached the thread that was already running
        assert result["other_thread_unshare"] == "EPERM" and result["this_thread_unshare"] == "EPERM"
    assert result["conv"][0] == "allowed"


def test_environment_is_scrubbed(zygote):
    result = _scenario(zygote, "hostile")
    assert not result["token_in_os_environ"]
    assert "GITHUB_TOKEN" not in result["environ_keys"] and "MY_SERVICE_PASSWORD" not in result["environ_keys"]
    assert result["home"] == zygote["cfg"]["scratch"]
    assert not result["secret_in_proc_self_environ"]
    assert result["read_secret_via_home"][0] == "denied"  # ~ is the scratch folder now


def test_caller_environment_and_memory_are_unreadable(zygote):
    result = _scenario(zygote, "hostile")
    _need(_report(result), "landlock")
    # ENOENT with its own PID namespace and /proc (the zygote cannot even be named), else EACCES
    assert result["read_parent_environ"] in (["denied", "ENOENT"], ["denied", "EACCES"])
    assert result["read_parent_mem_maps"] in (["denied", "ENOENT"], ["denied", "EACCES"])
    assert result["subprocess_cat_parent_environ"] == ["denied", "EPERM"]  # no program runs at all
    assert result["signal_parent"][0] == "denied"


def test_report_is_honest_without_landlock(zygote):
    """Without Landlock the secret file is readable (root owns it): the report must say so."""
    result = _scenario(zygote, "hostile_no_landlock")
    report = _report(result)
    assert report.mechanisms["landlock"] == "skipped: excluded by the policy"
    assert report.protections["filesystem"] == "none" and report.strength() == "partial"
    assert "filesystem" in report.strength_reason()
    if report.applied("namespaces"):  # another PID namespace (or user namespace) hides or guards it
        assert result["read_parent_environ"] in (["denied", "ENOENT"], ["denied", "EACCES"])
        assert report.protections["caller environ and memory"].startswith("namespaces")
        assert result["tcp_connect_127.0.0.1"][0] == "denied"
    if zygote["uid"] == 0:
        assert result["read_secret_file"][0] == "allowed"
        # but writes stay closed: every mount except scratch is read-only in its mount namespace
        assert result["write_outside_scratch"] == ["denied", "EROFS"]


def test_filesystem_view(zygote):
    result = _scenario(zygote, "hostile")
    _need(_report(result), "landlock")
    assert result["read_secret_file"] == ["denied", "EACCES"]
    assert result["read_etc_shadow"][0] == "denied"
    assert result["read_repo_file"][0] == "allowed"
    assert result["write_repo_file"] in (["denied", "EROFS"], ["denied", "EACCES"])  # read-only mount, landlock
    assert result["write_outside_scratch"] in (["denied", "EROFS"], ["denied", "EACCES"])
    assert result["write_scratch"][0] == "allowed"
    assert not os.path.exists(os.path.join(zygote["cfg"]["outside"], "pwned-hostile"))
    assert not os.path.exists(os.path.join(zygote["cfg"]["repo"], "pwned-hostile.py"))


def test_dangerous_syscalls_are_denied(zygote):
    result = _scenario(zygote, "hostile")
    _need(_report(result), "seccomp")
    for name in ("ptrace_attach_parent", "process_vm_readv", "unshare_user", "mount", "bpf", "keyctl",
                 "userfaultfd", "perf_event_open"):
        assert result[name] == "EPERM", (name, result[name])


def test_processes_are_allowed_but_programs_are_not(zygote):
    result = _scenario(zygote, "hostile")
    _need(_report(result), "seccomp")
    assert result["subprocess_true"] == ["denied", "EPERM"]  # execve is refused once the worker runs
    assert result["thread"][0] == "allowed"


def test_subprocesses_can_be_forbidden(zygote):
    result = _scenario(zygote, "no_subprocess")
    _need(_report(result), "seccomp")
    assert result["subprocess_true"][0] == "denied"
    assert result["os_fork"][0] == "denied"
    assert result["conv"][0] == "allowed" and result["thread"][0] == "allowed"


def test_benign_oneflow_computation_still_works(zygote):
    result = _scenario(zygote, "hostile")
    assert result["conv"][0] == "allowed" and isinstance(result["conv"][1], float)
    assert result["thread"][0] == "allowed"


def test_cpu_limit_stops_a_spinning_worker(zygote):
    result = zygote["scenarios"]["spin"]
    assert result.get("spinning")
    assert result["exit"].get("signal") in ("SIGXCPU", "SIGKILL"), result["exit"]


def test_memory_rlimit_fails_allocations_but_not_oneflow(zygote):
    result = _scenario(zygote, "alloc_rlimit")
    assert result["alloc_2gib"] == ["denied", "MemoryError"]
    assert result["conv_after"][0] == "allowed"


def test_rss_watchdog_kills_a_memory_hog(zygote):
    result = zygote["scenarios"]["alloc_forever"]
    assert not result.get("survived")
    assert result["exit"] == {"signal": "SIGKILL"}
    kills = zygote["memory_kills"]
    assert len(kills) == 1 and kills[0]["reason"] == "memory" and kills[0]["rss"] > 768 << 20
    assert result["allocated_mib"] < 4096


def test_fork_bomb_is_bounded(zygote):
    result = zygote["scenarios"]["fork_bomb"]
    report = _report(result)
    if zygote["uid"] == 0:
        # RLIMIT_NPROC is not enforced for root, and the report says so; the watchdog does the job.
        assert report.protections["processes"].startswith("the caller's watchdog")
        assert "not enforced for uid 0" in report.details["limits"]
        assert result["exit"] == {"signal": "SIGKILL"}
        assert [k["reason"] for k in zygote["process_kills"]] == ["processes"]
        assert zygote["process_kills"][0]["processes"] < 200
        nobody = zygote["scenarios"]["fork_bomb_nobody"]
        assert "error" not in nobody, nobody["error"]
        assert nobody["forks"] < 16 and nobody["fork_error"] == "EAGAIN", nobody
    else:
        assert result["forks"] < 16 and result["fork_error"] == "EAGAIN"
    assert result["leftover_group"] == 0


@pytest.mark.parametrize("skip", [(), ("namespaces",)], ids=["netns", "landlock-net"])
def test_spawned_worker_can_import_oneflow_after_apply(tmp_path, skip):
    """OneFlow's startup binds 127.0.0.1:0: fine in a network namespace, and allowed by Landlock."""
    import socket

    env = _secret_env(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        cfg = {"scratch": str(tmp_path / "scratch"), "port": listener.getsockname()[1], "skip": list(skip)}
        result = _run_python(SPAWNED, cfg, env, timeout=120)
    assert result["threads_before"] == 1
    assert result["shape"] == [1, 4, 14, 14]
    assert not result["token"]
    report = SandboxReport.from_dict(result["report"])
    if not report.protections["network"].startswith(("none", "partial")):
        assert result["connect"] == "denied"


def test_probe_names_every_mechanism(tmp_path):
    code = "import json, flowhub.sandbox as sb; print(json.dumps(sb.probe().as_dict()))"
    result = _run_python(code, {}, dict(os.environ), timeout=120)
    report = SandboxReport.from_dict(result)
    assert list(report.mechanisms) == list(MECHANISMS)
    assert result["strength"] in ("strong", "partial", "weak")
    assert set(report.checks) >= {"write outside scratch", "write inside scratch", "read /proc/<caller>/environ",
                                  "connect to the caller's unix socket", "prlimit the caller", "run a program",
                                  "set file times outside scratch", "see the caller in /proc", "signal the caller"}
    if report.applied("landlock"):
        assert report.checks["write outside scratch"].startswith("denied")
        assert report.checks["write inside scratch"] == "allowed"
    if report.applied("seccomp"):  # what the probe claims is what it tried
        for check in ("connect to the caller's unix socket", "prlimit the caller", "run a program"):
            assert report.checks[check] == "denied (EPERM)", check
    if "PID namespace" in report.details.get("namespaces", ""):
        assert report.checks["see the caller in /proc"] == "denied (ENOENT)"
        assert report.checks["set file times outside scratch"] == "denied (EROFS)"
    text = format_report(report)
    for name in MECHANISMS:
        assert name in text


def test_policy_environment_filter():
    policy = SandboxPolicy(scratch="/tmp/flowhub-scratch", env_set=(("OMP_NUM_THREADS", "1"),))
    env = policy.environ({"PATH": "/usr/bin", "LC_ALL": "C", "GITHUB_TOKEN": "x", "PYTHONSTARTUP": "/a",
                          "PYTHONPATH": "/p", "OMP_NUM_THREADS": "4", "AWS_SECRET_ACCESS_KEY": "k",
                          "LD_PRELOAD": "/evil.so", "PYTHON_API_KEY": "k", "HOME": "/root"})
    assert env == {"PATH": "/usr/bin", "LC_ALL": "C", "PYTHONPATH": "/p", "OMP_NUM_THREADS": "1",
                   "HOME": "/tmp/flowhub-scratch", "TMPDIR": "/tmp/flowhub-scratch", "TMP": "/tmp/flowhub-scratch",
                   "TEMP": "/tmp/flowhub-scratch"}
    with pytest.raises(ValueError):
        SandboxPolicy(scratch="relative")


def test_report_strength_and_format():
    report = SandboxReport(mechanisms={"environment": "applied", "landlock": "unavailable: no ABI"},
                           protections={"network": "namespaces", "filesystem": "none", "syscalls": "seccomp",
                                        "environment": "environment"})
    assert report.strength() == "partial"
    assert "filesystem" in report.strength_reason()
    assert "unavailable: no ABI" in format_report(report)
    assert SandboxReport.from_dict(report.as_dict()) == report
