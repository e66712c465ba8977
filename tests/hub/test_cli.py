"""The real ``flowhub`` console script, run in a subprocess: output and exit codes."""
from __future__ import annotations

import os
import subprocess
import sys

import requests

REPO = "flowhub-examples/tiny-models"
FLOWHUB = os.path.join(os.path.dirname(sys.executable), "flowhub")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([FLOWHUB, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_console_script_and_module_help():
    proc = run("--help")
    assert proc.returncode == 0 and "list" in proc.stdout and "serve" in proc.stdout
    module = subprocess.run([sys.executable, "-m", "flowhub", "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout == proc.stdout
    assert run().returncode == 2  # no command: usage error


def test_list_help_load(gh):
    proc = run("list", f"{REPO}:v0.1", "--trust", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["tinymlp", "tinynet", "version"]
    proc = run("help", f"{REPO}:v0.1", "tinynet")
    assert proc.returncode == 0 and proc.stdout.startswith("TinyNet: a small CNN classifier")
    proc = run("load", f"{REPO}:v0.1", "tinynet", "pretrained=True", "--input-shape", "2x3x32x32", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("TinyNet: 1,578 parameters in 11 tensors")
    assert "output for a random input of shape (2, 3, 32, 32): shape (2, 10)" in proc.stdout
    proc = run("load", f"{REPO}:v0.1", "tinymlp", "hidden=7", "-q")
    assert proc.returncode == 0 and "in_features=64, out_features=7" in proc.stdout
    proc = run("load", f"{REPO}:v0.1", "tinymlp", "pretrained=True", "-q")
    assert proc.returncode == 0 and "Downloading" in proc.stderr and "%|" not in proc.stderr  # -q: no bars
    proc = run("load", f"{REPO}:v0.1", "tinynet", "pretrained=True", "--force-reload")
    assert proc.returncode == 0 and "%|" in proc.stderr  # the hubconf's weight download shows its bar


def test_errors_exit_1_with_a_message_and_no_traceback(gh):
    proc = run("list", "not-a-repo")
    assert proc.returncode == 1
    assert proc.stderr.startswith("flowhub: error: Invalid repository") and "Traceback" not in proc.stderr
    proc = run("list", f"{REPO}:v0.1")  # untrusted, no terminal: says how to trust it
    assert proc.returncode == 1 and "trust_repo=True" in proc.stderr
    proc = run("--offline", "list", f"{REPO}:v0.2", "--trust")
    assert proc.returncode == 1 and "offline" in proc.stderr.lower()


def test_trust_commands(gh, hub_dir):
    assert run("trust", "add", "Some-Owner/Repo").returncode == 0
    assert run("trust", "ls").stdout.split() == ["some-owner_repo"]
    assert run("trust", "rm", "some-owner/repo").returncode == 0
    assert run("trust", "ls").stdout.split() == []
    assert run("trust", "add").returncode == 2


def test_download(gh, hub_dir, example, tmp_path):
    name = example["weights"]["v0.1"]["tinynet"]
    url = f"{gh.url}/{REPO}/releases/download/v0.1/{name}"
    proc = run("download", url, "--check-hash", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(hub_dir / "checkpoints" / name)
    out = tmp_path / "copy.zip"
    proc = run("download", url, "-o", str(out), "--hash-prefix", "00000", "-q")
    assert proc.returncode == 1 and "invalid hash value" in proc.stderr and not out.exists()


def test_serve(hub_root):
    proc = subprocess.Popen([FLOWHUB, "serve", str(hub_root)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("Serving ")
        url = line.split(" at ")[1].split()[0]
        branches = requests.get(f"{url}/api/repos/{REPO}/branches", timeout=10).json()
        assert [b["name"] for b in branches] == ["main"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


def test_cache_ls_verify_prune(gh, hub_dir):
    import json
    import time

    assert run("cache", "ls").stdout.strip() == "(the cache is empty)"
    assert run("load", f"{REPO}:v0.1", "tinynet", "pretrained=True", "--trust", "-q").returncode == 0
    assert run("list", f"{REPO}:v0.2", "--trust", "-q").returncode == 0
    entries = json.loads(run("cache", "ls", "--json").stdout)
    kinds = sorted((e["kind"], e["name"]) for e in entries)
    assert kinds == [("repo", "flowhub-examples_tiny-models_v0.1"), ("repo", "flowhub-examples_tiny-models_v0.2"),
                     ("weights", next(e["name"] for e in entries if e["kind"] == "weights"))]
    repo_v01 = next(e for e in entries if e["name"].endswith("v0.1"))
    assert repo_v01["source"] == f"{REPO}:v0.1" and len(repo_v01["sha"]) == 40 and repo_v01["size"] > 0
    weights = next(e for e in entries if e["kind"] == "weights")
    assert weights["source"].endswith(weights["name"]) and len(weights["sha"]) == 64

    proc = run("cache", "verify")
    assert proc.returncode == 0 and "3 entries checked, 0 corrupt" in proc.stdout
    # corrupt the weight file in place (same size) and delete a file of a checkout
    path = hub_dir / "checkpoints" / weights["name"]
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    (hub_dir / "flowhub-examples_tiny-models_v0.2" / "weights.json").unlink()
    proc = run("cache", "verify")
    assert proc.returncode == 1 and "3 entries checked, 2 corrupt" in proc.stdout
    assert "SHA-256 differs" in proc.stdout and "1 of 4 files are missing" in proc.stdout

    proc = run("cache", "prune", "--corrupt", "--dry-run")
    assert proc.returncode == 0 and "would remove 2 entries" in proc.stdout and path.exists()
    proc = run("cache", "prune", "--corrupt")
    assert "removed 2 entries" in proc.stdout and not path.exists()
    assert [e["name"] for e in json.loads(run("cache", "ls", "--json").stdout)] == ["flowhub-examples_tiny-models_v0.1"]
    # the pruned entries come back on the next load
    assert run("load", f"{REPO}:v0.1", "tinynet", "pretrained=True", "-q").returncode == 0
    time.sleep(1.1)
    assert run("list", f"{REPO}:v0.1", "-q").returncode == 0  # marks the checkout as used now
    proc = run("cache", "prune", "--max-size", "1", "--dry-run")
    assert "would remove 2 entries" in proc.stdout
    proc = run("cache", "prune", "--older-than", "1h")
    assert "removed 0 entries" in proc.stdout
    assert run("cache", "prune", "--max-size", "lots").returncode == 2


def test_lock_and_verify(gh, hub_dir, tmp_path):
    import json

    lock = tmp_path / "flowhub.lock"
    proc = run("lock", f"{REPO}:v0.1", "tinynet", "pretrained=True", "--trust", "-q", "--lockfile", str(lock), "--json")
    assert proc.returncode == 0, proc.stderr
    prov = json.loads(proc.stdout)
    assert prov["entrypoint"] == "tinynet" and len(prov["sha"]) == 40 and len(prov["weights"]) == 1
    data = json.loads(lock.read_text())
    assert data["repos"] == {f"{REPO}:v0.1": {"sha": prov["sha"], "locked_at": data["repos"][f"{REPO}:v0.1"]["locked_at"]}}
    proc = run("verify", "--lockfile", str(lock))
    assert proc.returncode == 0 and "1 repos and 1 weight files checked, 0 failed" in proc.stdout
    cached = hub_dir / "checkpoints" / prov["weights"][0]["file"]
    data = bytearray(cached.read_bytes())
    data[50] ^= 0xFF
    cached.write_bytes(bytes(data))
    proc = run("verify", "--lockfile", str(lock))
    assert proc.returncode == 1 and "do not match the lockfile" in proc.stdout and "1 failed" in proc.stdout
    assert run("verify", "--lockfile", str(tmp_path / "missing.lock")).returncode == 1


def test_load_in_proxy_mode(gh):
    proc = run("load", f"{REPO}:v0.1", "tinynet", "pretrained=True", "--mode", "proxy", "--trust", "-q",
               "--input-shape", "1x3x32x32")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.endswith("TinyNet (proxy: it stays in its worker): 1,578 parameters in 11 tensors")
    assert "output for a random input of shape (1, 3, 32, 32): shape (1, 10)" in proc.stdout
