"""Reading what a repository declares without running it, and what this environment lacks of it."""
from __future__ import annotations

import pickle
import textwrap

import pytest

from flowhub import requirements
from flowhub.errors import MissingModuleError


def write(folder, files):
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(folder)


def texts(reqs, source=None):
    return [d.text for d in reqs.declared if source is None or d.source.startswith(source)]


def test_every_source_is_read_statically_and_setup_py_never_runs(tmp_path):
    marker = tmp_path / "ran"
    repo = write(tmp_path / "repo", {
        "hubconf.py": f"""
            open({str(marker)!r}, "w").write("hubconf ran")
            dependencies: list = ["oneflow", "scipy"]
            """,
        "requirements.txt": """
            # comment
            six>=1.15  # trailing comment
            --index-url https://example.invalid/simple
            tabulate==0.9.0 \\
                ; python_version >= "3"
            """,
        "pyproject.toml": """
            [project]
            name = "x"
            dependencies = ["rich>=10", "termcolor"]
            """,
        "setup.cfg": """
            [options]
            install_requires =
                colorama
                wcwidth; sys_platform == "linux"
            """,
        "setup.py": f"""
            open({str(marker)!r}, "w").write("setup ran")
            from setuptools import setup
            requirements = ["numpy", "rich", "tabulate", "six"]
            pillow_ver = " >= 5.3.0, !=8.3.*"
            requirements.append(("pillow-simd" if 0 else "pillow") + pillow_ver)
            requirements += ["attrs"]
            if __name__ == "__main__":
                setup(name="flowvision", install_requires=requirements)
            """})
    reqs = requirements.read(repo)
    assert not marker.exists()
    assert texts(reqs, "hubconf.py") == ["oneflow", "scipy"]
    assert all(d.import_name for d in reqs.declared if d.source.startswith("hubconf.py"))
    assert texts(reqs, "requirements.txt") == ["six>=1.15", 'tabulate==0.9.0      ; python_version >= "3"']
    assert texts(reqs, "pyproject.toml") == ["rich>=10", "termcolor"]
    assert texts(reqs, "setup.cfg") == ["colorama", 'wcwidth; sys_platform == "linux"']
    assert texts(reqs, "setup.py") == ["numpy", "rich", "tabulate", "six", "attrs"]  # as flowvision's reads
    assert any("--index-url" in n for n in reqs.notes)
    assert any("partly computed" in n for n in reqs.notes)  # pillow's computed line is said, not guessed
    described = reqs.describe()
    assert "setup.py install_requires: numpy, rich, tabulate, six, attrs" in described
    assert "hubconf.py dependencies: oneflow, scipy" in described


def test_literal_install_requires_and_unreadable_files(tmp_path):
    repo = write(tmp_path / "a", {"setup.py": "import setuptools\nsetuptools.setup(install_requires=['six', 'tabulate'])\n",
                                  "hubconf.py": "dependencies = make()\n"})
    reqs = requirements.read(repo)
    assert texts(reqs) == ["six", "tabulate"]
    assert any("not a literal list" in n for n in reqs.notes)
    broken = write(tmp_path / "b", {"setup.py": "setup(install_requires=[\n", "pyproject.toml": "[project\n",
                                    "hubconf.py": "x = " + "(" * 200000 + ")" * 200000 + "\n"})
    reqs = requirements.read(broken)
    assert reqs.declared == [] and len(reqs.notes) == 3
    assert requirements.read(write(tmp_path / "c", {"hubconf.py": "def f(): pass\n"})).describe() == "(none declared)"


def test_unsatisfied_keeps_only_what_this_environment_lacks(tmp_path):
    repo = write(tmp_path / "repo", {
        "hubconf.py": "dependencies = ['oneflow', 'mylocal', 'torch', 'six']\n",
        "mylocal/__init__.py": "",
        "requirements.txt": """
            numpy<2
            six
            six>=1.15
            tabulate; python_version < "3"
            oneflow>=99
            pkg @ https://example.invalid/pkg.whl
            not a requirement !
            rich[jupyter]
            """})
    needed, refused = requirements.unsatisfied(requirements.read(repo), repo, provided=["torch"])
    # numpy<2 and oneflow (hubconf) are met here; mylocal is the repo's; torch is provided; a false marker drops
    # tabulate; the two six lines merge (the hubconf's import name "six" joins them)
    assert needed == ["oneflow>=99", "rich[jupyter]", "six>=1.15"]
    assert len(refused) == 2 and "direct URL" in refused[0] and "not a requirement" in refused[1]


def test_missing_module_error_is_a_module_not_found_error_that_crosses_processes(tmp_path):
    repo = write(tmp_path / "repo", {"setup.py": "setup(install_requires=['tabulate'])\n"})
    err = requirements.missing_module_error(ModuleNotFoundError("No module named 'tabulate.x'"), "o/r@main",
                                            "load", "net", repo, overlays=False)
    assert isinstance(err, ModuleNotFoundError) and err.name == "tabulate.x"
    assert "o/r@main: entrypoint 'net' needs the module 'tabulate.x'" in str(err)
    assert "setup.py install_requires: tabulate" in str(err)
    assert "pip install 'tabulate'" in str(err)  # the declared requirement that provides it
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is MissingModuleError and str(again) == str(err) and again.name == "tabulate.x"
    with_overlays = requirements.missing_module_error(ModuleNotFoundError("x", name="yaml"), "o/r@main", "help",
                                                      "net", repo, overlays=True)
    assert "help for entrypoint 'net'" in str(with_overlays) and "does not declare it" in str(with_overlays)


def test_pytorch_extensions_are_refused_and_explained_under_mock_torch(tmp_path):
    """Under mock_torch (``torch`` provided) torchvision & co. cannot run, wherever installed: an overlay
    never installs them (torchvision's wheel would pull in torch), and the error says why, not how."""
    repo = write(tmp_path / "repo", {"hubconf.py": "dependencies = ['torch', 'torchvision']\n",
                                     "requirements.txt": "torchaudio>=2\nsix\n"})
    needed, refused = requirements.unsatisfied(requirements.read(repo), repo, provided=["torch"])
    assert "torchvision" not in " ".join(needed) and "torchaudio" not in " ".join(needed)
    assert [r.split(" (")[0] for r in refused] == ["'torchvision'", "'torchaudio>=2'"]
    assert all("a compiled PyTorch extension, which oneflow.mock_torch cannot stand in for" in r for r in refused)
    needed, refused = requirements.unsatisfied(requirements.read(repo), repo)  # without mock_torch: installable
    assert "torchaudio>=2" in needed and not refused
    err = requirements.missing_module_error(ModuleNotFoundError("x", name="torchvision.models"), "o/r@main",
                                            "load", "net", repo, overlays=True, mock_torch=True)
    text = str(err)
    assert "'torchvision' is a compiled extension of PyTorch" in text and "Oneflow-Inc/vision" in text
    assert "pip install" not in text and "overlay that only its worker sees" not in text
    assert str(pickle.loads(pickle.dumps(err))) == text
    plain = requirements.missing_module_error(ModuleNotFoundError("x", name="torchvision"), "o/r@main", "load",
                                              "net", repo, overlays=False)
    assert "compiled extension" not in str(plain) and "Two ways out" in str(plain)  # real torch may be there


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_install_requirements_setting(monkeypatch, value, tmp_path):
    from flowhub import settings

    monkeypatch.setenv("FLOWHUB_INSTALL_REQUIREMENTS", value)
    assert settings.resolve({"hub_dir": str(tmp_path)}).install_requirements is True
    assert settings.resolve({"hub_dir": str(tmp_path), "install_requirements": False}).install_requirements is False
    monkeypatch.setenv("FLOWHUB_INSTALL_REQUIREMENTS", "maybe")
    with pytest.raises(ValueError, match="FLOWHUB_INSTALL_REQUIREMENTS"):
        settings.resolve({"hub_dir": str(tmp_path)})
