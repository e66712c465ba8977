"""The shared zygote service (``FLOWHUB_ZYGOTE=shared``): one warm zygote per user and environment.

Real processes throughout: callers are fresh interpreters (or managers in this one), the service is
the real detached process, and each test gets a runtime folder of its own so "who started it" is
known.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

from flowhub.worker.host.pool import WorkerManager
from flowhub.worker.host.service import (SharedZygoteHandle, describe_report, service_status, stop_services,
                                         zygote_report)
from flowhub.worker.wire import protocol

HERE = os.path.dirname(os.path.abspath(__file__))
V1 = os.path.join(HERE, "worker_repos", "v1")
PY = sys.executable


@pytest.fixture
def runtime(monkeypatch):
    """A runtime folder of this test's own; its services are stopped afterwards."""
    folder = tempfile.mkdtemp(prefix="fh-z-")
    monkeypatch.setenv("FLOWHUB_RUNTIME_DIR", folder)
    monkeypatch.setenv("FLOWHUB_ZYGOTE", "shared")
    yield folder
    stop_services(folder)
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


CALLER = textwrap.dedent(f"""
    import json, os, sys
    from flowhub.worker.host.pool import get_manager
    m = get_manager()
    pid = m.call(repo_dir={V1!r}, key="v1", op="load", model="pid")
    env = m.call(repo_dir={V1!r}, key="v1", op="load", model="echo_env", args=("FLOWHUB_TEST_MARK",))
    import psutil
    print(json.dumps({{"worker": pid, "ppid": psutil.Process(pid).ppid(), "service": m.zygote_pid,
                      "started": m._zygote.started_service, "how": m.zygote_started_by, "env": env,
                      "me": os.getpid()}}), flush=True)
""")


def run_caller(mark: str = "", cwd: str = None, extra: str = "") -> dict:
    env = dict(os.environ, FLOWHUB_TEST_MARK=mark)
    out = subprocess.run([PY, "-c", CALLER + extra], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_second_process_is_served_by_the_running_service(runtime, tmp_path):
    first = run_caller("one")
    assert first["how"] == "shared" and first["started"] is True
    assert first["ppid"] == first["service"]  # the worker is the service's child, not the caller's
    service = psutil.Process(first["service"])
    assert service.ppid() != first["me"] and service.is_running()  # it outlived its first caller

    second = run_caller("two", cwd=str(tmp_path))
    assert second["started"] is False and second["service"] == first["service"]
    assert second["ppid"] == first["service"]  # forked by the same warm service, no new zygote
    assert second["env"] == ["two", str(tmp_path)]  # the caller's environment and folder, not the first's
    assert stat.S_IMODE(os.stat(runtime).st_mode) == 0o700
    sock = [n for n in os.listdir(runtime) if n.endswith(".sock")]
    assert len(sock) == 1 and stat.S_IMODE(os.stat(os.path.join(runtime, sock[0])).st_mode) == 0o600


def test_a_worker_gets_the_callers_folder_and_import_path(runtime, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "hubconf.py").write_text("import os, sys\ndef where():\n    return [os.getcwd(), sys.path]\n")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.append({str(tmp_path / 'extra')!r})
        from flowhub.worker.host.pool import get_manager
        m = get_manager()
        print(json.dumps(m.call(repo_dir={str(probe)!r}, key="probe", op="load", model="where")), flush=True)
    """)
    out = subprocess.run([PY, "-c", script], cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cwd, path = json.loads(out.stdout.strip().splitlines()[-1])
    assert os.path.realpath(cwd) == os.path.realpath(str(tmp_path))
    assert str(tmp_path / "extra") in path


def test_a_killed_service_is_replaced(runtime):
    own = WorkerManager(zygote_start="shared")
    try:
        first = own.call(repo_dir=V1, key="v1", op="load", model="pid")
        service = own.zygote_pid
        assert psutil.Process(first).ppid() == service
        os.kill(service, signal.SIGKILL)
        assert wait_gone(service) and wait_gone(first)  # its workers die with it (PDEATHSIG)
        second = own.call(repo_dir=V1, key="v1", op="load", model="pid")
        assert second != first and own.zygote_pid not in (None, service)
        assert psutil.Process(second).ppid() == own.zygote_pid
        assert run_caller()["service"] == own.zygote_pid  # the socket now leads to the new one
    finally:
        own.shutdown()


def test_a_service_of_another_environment_is_never_used(runtime):
    plain = SharedZygoteHandle()
    other = SharedZygoteHandle(env=dict(plain.env, ONEFLOW_FLOWHUB_TEST_ONLY="1"))  # shapes imports: differs
    assert plain.digest != other.digest and plain.path != other.path
    with other.lock:
        other.start()
        other.wait_ready()
    planted = other.pid
    other.close()
    os.rename(other.path, plain.path)  # a mismatched service now answers at this environment's socket
    result = run_caller()
    assert result["service"] != planted and result["started"] is True  # refused, and replaced
    assert wait_gone(planted, 15)  # its socket was taken over: it leaves once it has no caller


def test_another_uid_is_refused(runtime):
    if os.getuid() != 0:
        pytest.skip("needs root to act as a second user")
    handle = SharedZygoteHandle()
    with handle.lock:
        handle.start()
        handle.wait_ready()
    try:
        os.chmod(runtime, 0o755)  # let the other user reach the socket at all: the service must still refuse
        os.chmod(handle.path, 0o777)
        child = os.fork()
        if child == 0:
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(handle.path)  # the folder and socket let us in: only the service's check is left
                code = 4
                try:
                    protocol.send_message(s, {"op": "hello", "identity": handle.digest})
                    protocol.recv_message(s, time.monotonic() + 10)
                    code = 1  # answered: wrong
                except (protocol.PeerClosed, ConnectionError):  # refused at once (maybe before our hello)
                    code = 0  # closed without a word
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        reply = handle.request({"op": "status"})  # and it still serves its own user
        assert reply["pid"] == handle.pid
    finally:
        os.chmod(runtime, 0o700)
        handle.close()


def test_an_unsafe_runtime_folder_is_never_used(runtime, capsys):
    os.chmod(runtime, 0o755)
    own = WorkerManager()
    try:
        assert own.call(repo_dir=V1, key="v1", op="load", model="version") == "v1"
        assert own.zygote_started_by in ("fork", "spawn")  # this process's own zygote, not a service
        assert not [n for n in os.listdir(runtime) if n.endswith(".sock")]
    finally:
        own.shutdown()
    assert "not using a shared zygote service" in capsys.readouterr().err


def test_sixteen_processes_starting_at_once_start_one_service(runtime):
    code = ("from flowhub.worker.host.service import SharedZygoteHandle\n"
            "h = SharedZygoteHandle()\nh.start(); h.wait_ready(); print(h.pid, h.started_service, flush=True)\n"
            "import time; time.sleep(0.5)\n")
    procs = [subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(16)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        pid, started = out.split()
        results.append((int(pid), started == "True"))
    assert len({pid for pid, _ in results}) == 1
    assert sum(started for _, started in results) == 1


def test_a_busy_worker_dies_with_its_sigkilled_caller(runtime):
    script = textwrap.dedent(f"""
        import threading, time
        from flowhub.worker.host.pool import get_manager
        m = get_manager()
        print(m.call(repo_dir={V1!r}, key="v1", op="load", model="pid"), flush=True)
        m.call(repo_dir={V1!r}, key="v1", op="load", model="hang", args=(120,))
    """)
    proc = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    time.sleep(1.0)  # it is inside hang() now
    assert psutil.Process(worker).status() != psutil.STATUS_ZOMBIE
    proc.kill()
    proc.wait(timeout=30)
    assert wait_gone(worker, 10)  # the service saw its caller go and killed the worker


def test_an_idle_service_exits_and_doctor_shows_it(runtime, monkeypatch):
    monkeypatch.setenv("FLOWHUB_ZYGOTE_IDLE_TIMEOUT", "1")
    result = run_caller()
    info = service_status()
    assert info["running"] and info["pid"] == result["service"] and info["callers"] == 1  # just us, asking
    report = zygote_report()  # what flowhub doctor shows
    assert report["kind"] == "shared" and report["services"]["plain"]["pid"] == result["service"]
    assert f"plain service:   pid {result['service']}" in describe_report(report)
    assert wait_gone(result["service"], 15)
    assert not service_status()["running"]
    assert not [n for n in os.listdir(runtime) if n.endswith(".sock")]


def test_a_caller_no_service_can_match_uses_a_zygote_of_its_own(runtime, tmp_path):
    """A caller whose sys.path finds another copy of a preloaded package than a fresh interpreter does
    (here cloudpickle) cannot be served by any service: it says so and uses a zygote of its own."""
    import shutil

    import cloudpickle

    shadow = tmp_path / "shadow"
    shutil.copytree(os.path.dirname(cloudpickle.__file__), shadow / "cloudpickle")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(shadow)!r})
        import cloudpickle
        assert cloudpickle.__file__.startswith({str(shadow)!r})
        from flowhub.worker.host.pool import get_manager
        m = get_manager()
        print(m.call(repo_dir={V1!r}, key="v1", op="load", model="version"), m.zygote_started_by, flush=True)
    """)
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    version, how = out.stdout.split()
    assert version == "v1" and how in ("fork", "spawn")
    assert "using a zygote of this process's own" in out.stderr


def test_a_fork_is_answered_by_the_waiting_spare(runtime):
    """The service keeps one worker forked ahead of time: the next fork request gets that process, and
    a new spare is ready after it."""
    own = WorkerManager(zygote_start="shared")
    try:
        own.call(repo_dir=V1, key="v1", op="load", model="version")  # the service is up
        with own._zygote.lock:
            spare = own._zygote.request({"op": "status"})["spare"]
        assert spare and psutil.Process(spare).ppid() == own.zygote_pid
        assert own.call(repo_dir=V1, key="other", op="load", model="pid") == spare
        with own._zygote.lock:
            after = own._zygote.request({"op": "status"})["spare"]
        assert after and after != spare
    finally:
        own.shutdown()


def test_a_worker_holds_no_socket_but_its_own(runtime, tmp_path):
    """A worker forked by the service keeps none of the service's descriptors: not its listener, not
    another caller's connection, not the spare's control socket (through which it could have the spare
    become a worker of its choosing)."""
    repo = tmp_path / "fds"
    repo.mkdir()
    (repo / "hubconf.py").write_text(
        "import os\n"
        "def sockets():\n"
        "    links = []\n"
        "    for n in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            links.append(os.readlink(f'/proc/self/fd/{n}'))\n"
        "        except OSError:\n"
        "            pass  # the descriptor listdir itself used\n"
        "    return sorted(l for l in links if l.startswith('socket:'))\n")
    other = WorkerManager(zygote_start="shared")  # a second caller connected meanwhile
    own = WorkerManager(zygote_start="shared")
    try:
        other.call(repo_dir=V1, key="v1", op="load", model="version")
        for key in ("a", "b", "c"):  # the first from the spare, later ones too, after new spares
            assert len(own.call(repo_dir=str(repo), key=key, op="load", model="sockets")) == 1
    finally:
        own.shutdown()
        other.shutdown()
