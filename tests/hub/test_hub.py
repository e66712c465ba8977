"""The reference's behaviour, call by call (torch's test_hub.py re-expressed), against the loopback server."""
from __future__ import annotations

import os
import stat
import sys
import warnings
import zipfile

import oneflow as flow
import pytest

import flowhub
from conftest import expected_state_dict, make_repo, run_python
from flowhub.errors import EntrypointError, MissingDependenciesError, OfflineError, ResolveError

REPO = "flowhub-examples/tiny-models"


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert set(ours) == set(state_dict)
    for key, value in state_dict.items():
        assert flow.equal(ours[key], value), key


def test_load_from_github_with_pretrained_weights(gh, hub_root, example, tmp_path):
    model = flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    assert type(model).__name__ == "TinyNet"
    assert_same_weights(model, expected_state_dict(hub_root, example, "v0.1", "tinynet", tmp_path))
    assert model(flow.ones(2, 3, 32, 32)).shape == (2, 10)
    # kwargs reach the entrypoint
    assert flowhub.load(f"{REPO}:v0.1", "tinynet", num_classes=3, trust_repo=True).classifier.out_features == 3


def test_load_from_local_dir(gh, hub_dir):
    flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    local = hub_dir / "flowhub-examples_tiny-models_v0.1"
    assert flowhub.load(str(local), "version", source="local") == "0.1"
    assert flowhub.load(str(local), "version", source="LOCAL") == "0.1"  # source is case-insensitive


def test_load_from_branch_with_slash(gh, hub_root, hub_dir):
    make_repo(hub_root, "slashy", "repo", {"hubconf.py": "def where():\n    return 'main'\n"},
              branches={"ci/test_slash": {"hubconf.py": "def where():\n    return 'slash'\n"}})
    assert flowhub.load("slashy/repo:ci/test_slash", "where", trust_repo=True) == "slash"
    assert (hub_dir / "slashy_repo_ci_test_slash" / "hubconf.py").is_file()


def test_get_set_dir_and_cache_layout(gh, tmp_path):
    flowhub.set_dir(tmp_path / "custom_hub")
    assert flowhub.get_dir() == str(tmp_path / "custom_hub")
    flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    assert (tmp_path / "custom_hub" / "flowhub-examples_tiny-models_v0.1" / "hubconf.py").is_file()
    assert (tmp_path / "custom_hub" / "trusted_list").read_text().split() == ["flowhub-examples_tiny-models"]
    # no shared '<ref>.zip' or extracted top folder is left in the hub folder
    assert sorted(p.name for p in (tmp_path / "custom_hub").iterdir()) == [
        ".flowhub", "flowhub-examples_tiny-models_v0.1", "trusted_list"]


def test_list_and_help(gh):
    assert flowhub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    assert "labels" in flowhub.list(f"{REPO}:v0.2", trust_repo=True)
    doc = flowhub.help(f"{REPO}:v0.1", "tinynet")
    assert doc.strip().startswith("TinyNet: a small CNN classifier")


def test_default_branch_is_main_else_master_and_remembered(gh, hub_root, hub_dir):
    make_repo(hub_root, "old", "style", {"hubconf.py": "def b():\n    return 'master'\n"}, branch="master")
    assert flowhub.load("old/style", "b", trust_repo=True) == "master"
    assert (hub_dir / "old_style_master").is_dir()
    assert "labels" in flowhub.list(REPO, trust_repo=True)  # main = v0.2 (in-process, `version` may be stale)
    # Once resolved, the default branch is remembered on disk: a new process makes no request at all.
    gh.clear_log()
    proc = run_python(f"import flowhub; print(flowhub.load({REPO!r}, 'version'))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("0.2")
    assert gh.requests == []


def test_cache_hit_with_explicit_ref_makes_no_request(gh):
    flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    gh.clear_log()
    assert flowhub.load(f"{REPO}:v0.1", "version") == "0.1"
    assert flowhub.list(f"{REPO}:v0.1") == ["tinymlp", "tinynet", "version"]
    assert gh.requests == []


def test_unknown_ref_and_commit_from_fork(gh, example):
    with pytest.raises(ValueError, match="If it's a commit from a forked repo"):
        flowhub.list(f"{REPO}:deadbeef", trust_repo=True)
    with pytest.raises(ResolveError, match="no-such-branch"):
        flowhub.list(f"{REPO}:no-such-branch", trust_repo=True)
    # a prefix of a tag's commit is accepted, like the reference
    assert flowhub.load(f"{REPO}:{example['tags']['v0.1'][:10]}", "version", trust_repo=True) == "0.1"


def test_unknown_ref_with_skip_validation(gh):
    gh.clear_log()
    with pytest.raises(ResolveError, match="404"):
        flowhub.list(f"{REPO}:no-such-branch", trust_repo=True, skip_validation=True)
    assert gh.count("/api/") == 0


def test_skip_validation_makes_no_api_call(gh):
    assert flowhub.load(f"{REPO}:v0.1", "version", trust_repo=True, skip_validation=True) == "0.1"
    assert gh.count("/api/") == 0 and gh.count("zipball") == 1


def test_unknown_entrypoint_and_missing_dependencies(gh, hub_root):
    with pytest.raises(RuntimeError, match="Cannot find callable nope in hubconf") as info:
        flowhub.load(f"{REPO}:v0.1", "nope", trust_repo=True)
    assert isinstance(info.value, EntrypointError) and "tinynet" in str(info.value)
    with pytest.raises(ValueError, match="model should be a string"):
        flowhub.help(f"{REPO}:v0.1", 3)
    make_repo(hub_root, "needs", "deps", {"hubconf.py": "dependencies = ['oneflow', 'no_such_pkg_xyz']\n"
                                                        "def m():\n    return 1\n"})
    with pytest.raises(MissingDependenciesError, match="Missing dependencies: no_such_pkg_xyz"):
        flowhub.load("needs/deps", "m", trust_repo=True)
    assert flowhub.list("needs/deps") == ["m"]  # list does not check dependencies, like the reference


def test_sys_path_restored_on_every_exit_path(gh, hub_root):
    make_repo(hub_root, "broken", "hub", {"hubconf.py": "import no_such_module_abc\n"})
    before = list(sys.path)
    with pytest.raises(ModuleNotFoundError):
        flowhub.list("broken/hub", trust_repo=True)
    assert sys.path == before
    with pytest.raises(RuntimeError):
        flowhub.load(f"{REPO}:v0.1", "missing", trust_repo=True)
    assert sys.path == before
    flowhub.load(f"{REPO}:v0.1", "version", trust_repo=True)
    assert sys.path == before


def test_owner_and_repo_spelling_share_one_cache_entry(gh, hub_dir):
    flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    gh.clear_log()
    assert flowhub.load("FlowHub-Examples/Tiny-Models:v0.1", "version", trust_repo="check") == "0.1"
    assert gh.requests == []
    assert [p.name for p in hub_dir.iterdir() if p.name.endswith("v0.1")] == ["flowhub-examples_tiny-models_v0.1"]


def test_force_reload_fetches_repo_and_weights_again(gh):
    flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    gh.clear_log()
    flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True)
    assert gh.requests == []
    flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, force_reload=True)
    assert gh.count("legacy.zip") == 1 and gh.count("releases/download") == 1


def test_offline_uses_cache_and_fails_fast_otherwise(gh, monkeypatch):
    flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    flowhub.list(REPO, trust_repo=True)
    gh.clear_log()
    monkeypatch.setenv("FLOWHUB_OFFLINE", "1")
    assert flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True).classifier.out_features == 10
    assert "labels" in flowhub.list(REPO)
    with pytest.raises(OfflineError, match="FLOWHUB_OFFLINE"):
        flowhub.list(f"{REPO}:v0.2")
    with pytest.raises(OfflineError, match="offline"):
        flowhub.load_state_dict_from_url(f"{gh.url}/flowhub-examples/tiny-models/releases/download/v0.2/nothing.zip")
    assert gh.requests == []


def test_repo_without_hubconf_says_so(gh, hub_root):
    make_repo(hub_root, "nohub", "conf", {"README.md": "no hubconf here\n"})
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        flowhub.list("nohub/conf", trust_repo=True)


def test_ambiguous_ref_retries_as_branch(gh, hub_root):
    make_repo(hub_root, "amb", "ref", {"hubconf.py": "def which():\n    return 'main'\n"},
              branches={"dup": {"hubconf.py": "def which():\n    return 'branch'\n"}},
              tags={"dup": {"hubconf.py": "def which():\n    return 'tag'\n"}})
    with pytest.warns(UserWarning, match="ambiguous"):
        assert flowhub.load("amb/ref:dup", "which", trust_repo=True) == "branch"


def test_token_goes_only_to_the_api_host(gh, monkeypatch):
    monkeypatch.setenv("GITHUB_TOKEN", "secret-token")
    flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    api = [r for r in gh.requests if r.path.startswith("/api/")]
    other = [r for r in gh.requests if not r.path.startswith("/api/")]
    assert api and all(r.authorized for r in api)
    assert other and not any(r.authorized for r in other)


def test_rejected_token_is_retried_without_it(hub_root, monkeypatch):
    from flowhub.server import GitHubServer

    with GitHubServer(hub_root, reject_tokens=True) as srv:
        monkeypatch.setenv("GITHUB_TOKEN", "bad-token")
        hub = flowhub.Hub(github_url=srv.url, github_api_url=srv.api_url)
        with pytest.warns(UserWarning, match="retrying without it"):
            assert hub.load(f"{REPO}:v0.1", "version", trust_repo=True) == "0.1"
        assert srv.count(status=401) >= 1


def test_rate_limit_error_names_the_fixes(gh):
    from flowhub.server import Fault

    gh.add_fault(Fault(match="/api/*", kind="ratelimit", times=None))
    with pytest.raises(RuntimeError, match="rate-limited") as info:
        flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    assert "GITHUB_TOKEN" in str(info.value) and "skip_validation" in str(info.value)


def test_download_url_to_file_respects_umask(gh, tmp_path, example):
    url = f"{gh.url}/flowhub-examples/tiny-models/releases/download/v0.1/{example['weights']['v0.1']['tinymlp']}"
    dst = tmp_path / "downloaded.zip"
    flowhub.download_url_to_file(url, str(dst), progress=False)
    fresh = tmp_path / "fresh"
    fresh.write_bytes(b"")
    assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE(fresh.stat().st_mode)
    assert zipfile.is_zipfile(dst)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_download_url_to_file_hash_prefix(gh, tmp_path, example):
    name = example["weights"]["v0.1"]["tinymlp"]
    url = f"{gh.url}/flowhub-examples/tiny-models/releases/download/v0.1/{name}"
    prefix = name.rsplit("-", 1)[1].split(".")[0]
    flowhub.download_url_to_file(url, str(tmp_path / "ok"), hash_prefix=prefix, progress=False)
    with pytest.raises(RuntimeError, match="invalid hash value"):
        flowhub.download_url_to_file(url, str(tmp_path / "bad"), hash_prefix="0000000", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]


def test_load_state_dict_from_url_file_name_and_check_hash(gh, hub_dir, example, hub_root, tmp_path):
    name = example["weights"]["v0.1"]["tinynet"]
    url = f"{gh.url}/flowhub-examples/tiny-models/releases/download/v0.1/{name}"
    sd = flowhub.load_state_dict_from_url(url, check_hash=True, progress=False)
    assert "classifier.weight" in sd
    assert (hub_dir / "checkpoints" / name).is_file()
    sd2 = flowhub.load_state_dict_from_url(url, file_name="renamed.zip", progress=False)
    assert (hub_dir / "checkpoints" / "renamed.zip").is_file()
    expected = expected_state_dict(hub_root, example, "v0.1", "tinynet", tmp_path)
    for key in expected:
        assert flow.equal(sd[key], expected[key]) and flow.equal(sd2[key], expected[key])
    gh.clear_log()
    flowhub.load_state_dict_from_url(url, progress=False)
    assert gh.requests == []  # cached file, already extracted: no request, no re-extraction


def test_trust_none_warns_once_and_writes_nothing(gh, hub_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flowhub.list(f"{REPO}:v0.1")
    untrusted = [w for w in caught if "untrusted repository" in str(w.message)]
    assert len(untrusted) == 1
    assert "{calling_fn}" not in str(untrusted[0].message) and "list(..., trust_repo=" in str(untrusted[0].message)
    assert (hub_dir / "trusted_list").read_text() == ""


def test_trust_without_terminal_raises_with_instructions(gh, hub_dir):
    for trust in (False, "check"):
        with pytest.raises(Exception, match="trust_repo=True") as info:
            flowhub.list(f"{REPO}:v0.1", trust_repo=trust)
        assert "no terminal" in str(info.value)
    assert not (hub_dir / "flowhub-examples_tiny-models_v0.1").exists()  # trust is checked before downloading


def test_trust_true_check_and_legacy(gh, hub_dir):
    flowhub.list(f"{REPO}:v0.1", trust_repo=True)
    assert (hub_dir / "trusted_list").read_text().split() == ["flowhub-examples_tiny-models"]
    flowhub.list(f"{REPO}:v0.1", trust_repo="check")  # no prompt needed
    (hub_dir / "trusted_list").unlink()
    flowhub.list(f"{REPO}:v0.1", trust_repo="check")  # legacy rule: a downloaded folder counts as trusted
    assert (hub_dir / "trusted_list").read_text() == ""


def test_builtin_trusted_owners_are_exact(gh, hub_root, hub_dir):
    make_repo(hub_root, "Oneflow-Inc", "tiny", {"hubconf.py": "def ok():\n    return 1\n"})
    make_repo(hub_root, "o", "tiny", {"hubconf.py": "def ok():\n    return 1\n"})
    assert flowhub.load("Oneflow-Inc/tiny", "ok", trust_repo="check") == 1
    assert flowhub.load("oneflow-inc/tiny", "ok", trust_repo="check") == 1
    assert (hub_dir / "trusted_list").read_text() == ""
    with pytest.raises(Exception, match="Untrusted repository"):  # oneflow 0.9 trusted 'o' by substring
        flowhub.load("o/tiny", "ok", trust_repo="check")


@pytest.mark.parametrize("answer, trusted", [("y\n", True), ("yes\n", True), ("n\n", False), ("\n", False)])
def test_trust_prompt_on_a_terminal(gh, hub_dir, answer, trusted):
    import pty

    code = (f"import flowhub\n"
            f"try:\n    print('RESULT', flowhub.load({REPO + ':v0.1'!r}, 'version', trust_repo='check'))\n"
            f"except Exception as e:\n    print('RESULT', type(e).__name__, e)\n")
    master, slave = pty.openpty()
    os.write(master, answer.encode())
    try:
        proc = run_python(code, stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr
    assert "(y/N)?" in proc.stdout  # the question was asked on the terminal
    result = "RESULT " + proc.stdout.split("RESULT", 1)[1].strip()
    if trusted:
        assert result == "RESULT 0.1"
        assert (hub_dir / "trusted_list").read_text().split() == ["flowhub-examples_tiny-models"]
    else:
        assert result == "RESULT UntrustedRepositoryError Untrusted repository."
        assert not (hub_dir / "trusted_list").exists() or (hub_dir / "trusted_list").read_text() == ""
