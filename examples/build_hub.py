"""Build the bundled example hub as a GitHub-like folder that ``flowhub.server`` can serve.

    python examples/build_hub.py ROOT

creates ``ROOT/flowhub-examples/tiny-models.git`` (a bare git repository: tag ``v0.1``, then tag
``v0.2`` = branch ``main``, which applies ``tiny-models-v0.2.patch``) and each version's pretrained
weights as release files ``ROOT/flowhub-examples/tiny-models/releases/download/<tag>/<name>-<sha8>.zip``
(zipped OneFlow checkpoint folders, as hubs ship them). Weights are generated with fixed seeds in a
subprocess, so the calling process never imports the example's packages.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
OWNER, REPO = "flowhub-examples", "tiny-models"
SOURCE = HERE / REPO
PATCH_V02 = HERE / f"{REPO}-v0.2.patch"
_FIXED_TIME = (2024, 1, 1, 0, 0, 0)


def git(cwd: Path, *args: str) -> str:
    """Run git with a fixed identity and dates (reproducible commits); return its stdout."""
    env = dict(os.environ, GIT_AUTHOR_NAME="flowhub", GIT_AUTHOR_EMAIL="flowhub@example.invalid",
               GIT_COMMITTER_NAME="flowhub", GIT_COMMITTER_EMAIL="flowhub@example.invalid",
               GIT_AUTHOR_DATE="2024-01-01T00:00:00Z", GIT_COMMITTER_DATE="2024-01-01T00:00:00Z")
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


def zip_folder(folder: Path, dest: Path) -> None:
    """Zip ``folder`` as ``<folder name>/...`` with the folder entry first and fixed timestamps."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            rel_root = Path(root).relative_to(folder.parent).as_posix()
            zf.writestr(zipfile.ZipInfo(rel_root + "/", _FIXED_TIME), b"")
            for name in sorted(files):
                info = zipfile.ZipInfo(f"{rel_root}/{name}", _FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, (Path(root) / name).read_bytes())


def make_weights(checkout: Path, out_dir: Path, seed: int) -> Dict[str, str]:
    """Save seeded TinyNet/TinyMLP weights of ``checkout``'s code as ``<name>-<sha8>.zip``; return name → file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--weights", str(checkout), str(out_dir), str(seed)],
                   check=True, capture_output=True, text=True)
    return json.loads((out_dir / "names.json").read_text())


def _weights_main(checkout: str, out_dir: str, seed: int) -> None:
    import flowhub  # noqa: F401  (loads the CUDA libraries oneflow needs)
    import oneflow as flow

    sys.path.insert(0, checkout)
    from tinymodels.nets import TinyMLP, TinyNet

    names = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cls in (("tinynet", TinyNet), ("tinymlp", TinyMLP)):
            flow.manual_seed(seed)
            model = cls()
            for p in model.parameters():  # distinctive values, so a wrong checkpoint is noticed
                p.data.uniform_(-1, 1)
            folder = Path(tmp) / name
            flow.save(model.state_dict(), str(folder))
            raw = Path(tmp) / f"{name}.zip"
            zip_folder(folder, raw)
            digest = hashlib.sha256(raw.read_bytes()).hexdigest()[:8]
            final = Path(out_dir) / f"{name}-{digest}.zip"
            shutil.move(str(raw), final)
            names[name] = final.name
    (Path(out_dir) / "names.json").write_text(json.dumps(names))


def build(root: Path) -> Dict[str, object]:
    """Create the example hub under ``root``; return owner, repo, tags and their commit SHAs and weight files."""
    root = Path(root)
    bare = root / OWNER / f"{REPO}.git"
    releases = root / OWNER / REPO / "releases" / "download"
    info: Dict[str, object] = {"owner": OWNER, "repo": REPO, "tags": {}, "weights": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / REPO
        shutil.copytree(SOURCE, work, ignore=shutil.ignore_patterns("__pycache__"))
        git(work, "init", "-q", "-b", "main")
        for tag, seed in (("v0.1", 1), ("v0.2", 2)):
            if tag == "v0.2":
                git(work, "apply", "-p0", str(PATCH_V02))
            names = make_weights(work, releases / tag, seed)
            (releases / tag / "names.json").unlink()
            (work / "weights.json").write_text(json.dumps({"tag": tag, "files": names}, indent=1) + "\n")
            git(work, "add", "-A")
            git(work, "commit", "-q", "-m", f"Release {tag}")
            git(work, "tag", tag)
            info["tags"][tag] = git(work, "rev-parse", "HEAD")
            info["weights"][tag] = names
        if bare.exists():
            shutil.rmtree(bare)
        bare.parent.mkdir(parents=True, exist_ok=True)
        git(root, "clone", "-q", "--bare", str(work), str(bare))
    return info


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--weights":
        _weights_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) == 2:
        print(json.dumps(build(Path(sys.argv[1])), indent=1))
    else:
        sys.exit(__doc__)
