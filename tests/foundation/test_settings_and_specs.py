"""Repo spec parsing, hub-dir precedence and settings read at call time."""
import inspect

import oneflow.hub as reference
import pytest

import flowhub
from flowhub.errors import RepoSpecError
from flowhub.spec import parse_repo_spec


def test_public_api_matches_reference_signatures():
    for name in ("help", "load", "download_url_to_file", "load_state_dict_from_url", "get_dir", "set_dir"):
        ours = inspect.signature(getattr(flowhub, name))
        theirs = inspect.signature(getattr(reference, name))
        extra = ["weights_only"] if name == "load_state_dict_from_url" else []  # torch's trailing keyword
        assert list(ours.parameters) == list(theirs.parameters) + extra, name
        for pname, param in theirs.parameters.items():
            assert ours.parameters[pname].default == param.default, (name, pname)
    # list: the reference's parameters, plus torch's trailing `verbose`
    ours = list(inspect.signature(flowhub.list).parameters)
    assert ours[:4] == list(inspect.signature(reference.list).parameters) and ours[4:] == ["verbose"]
    assert flowhub.HASH_REGEX == reference.HASH_REGEX
    assert flowhub.MODULE_HUBCONF == "hubconf.py" and flowhub.VAR_DEPENDENCY == "dependencies"


@pytest.mark.parametrize("text, expected", [
    ("a/b:c", ("a", "b", "c")),
    ("Oneflow-Inc/vision", ("Oneflow-Inc", "vision", None)),
    ("o/r:ci/test_slash", ("o", "r", "ci/test_slash")),
    ("o/my.repo_x-1:v0.1", ("o", "my.repo_x-1", "v0.1")),
])
def test_parse_repo_spec(text, expected):
    spec = parse_repo_spec(text)
    assert (spec.owner, spec.repo, spec.ref) == expected


@pytest.mark.parametrize("text", ["", "noslash", "a/b/c", "/b", "a/", "a/b:", "a b/c", "a/b:bad ref",
                                  "a/b:../x", "-a/b", "a/..", "a/b:x..y", 42, None])
def test_malformed_repo_specs_give_clear_errors(text):
    with pytest.raises(RepoSpecError) as info:
        parse_repo_spec(text)
    assert isinstance(info.value, ValueError)  # the reference raises ValueError-compatible errors
    assert "repo" in str(info.value).lower() or "ref" in str(info.value).lower()


def test_unknown_source_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match='Unknown source: "svn"'):
        flowhub.load(str(tmp_path), "x", source="svn")


def test_hub_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ONEFLOW_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert flowhub.get_dir() == str(tmp_path / "home" / ".cache" / "oneflow" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert flowhub.get_dir() == str(tmp_path / "xdg" / "oneflow" / "hub")
    monkeypatch.setenv("ONEFLOW_HOME", str(tmp_path / "of"))
    assert flowhub.get_dir() == str(tmp_path / "of" / "hub")
    flowhub.set_dir("~/myhub")  # regression (torch #69761): '~' is expanded
    assert flowhub.get_dir() == str(tmp_path / "home" / "myhub")
    flowhub.set_dir(tmp_path / "explicit")
    assert flowhub.get_dir() == str(tmp_path / "explicit")
    assert flowhub.Hub().get_dir() == str(tmp_path / "explicit")  # set_dir applies to every Hub without its own
    assert flowhub.Hub(hub_dir=tmp_path / "own").get_dir() == str(tmp_path / "own")


def test_settings_are_read_at_call_time(monkeypatch):
    hub = flowhub.Hub()
    assert hub.settings().offline is False
    monkeypatch.setenv("FLOWHUB_OFFLINE", "1")
    monkeypatch.setenv("FLOWHUB_GITHUB_URL", "http://mirror.invalid/")
    monkeypatch.setenv("FLOWHUB_TIMEOUT", "2.5")
    s = hub.settings()
    assert (s.offline, s.github_url, s.timeout) == (True, "http://mirror.invalid", 2.5)
    assert flowhub.Hub(offline=False, timeout=7).settings().offline is False  # arguments beat the environment


@pytest.mark.parametrize("name, value", [("FLOWHUB_OFFLINE", "maybe"), ("FLOWHUB_TIMEOUT", "soon"),
                                         ("FLOWHUB_TIMEOUT", "-1"), ("FLOWHUB_MODE", "teleport")])
def test_bad_settings_say_which_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        flowhub.Hub().settings()


def test_import_flowhub_needs_no_ld_library_path(monkeypatch):
    from conftest import run_python

    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    proc = run_python("import flowhub, oneflow as flow; print(float(flow.ones(2, 2).sum()))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("4.0")
