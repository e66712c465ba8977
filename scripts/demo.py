"""flowhub's main job, shown offline: publish the bundled example hub on a loopback GitHub-compatible
server, then list, show help and load a model with pretrained weights through the real GitHub code path.

Run it with ``bash scripts/demo.sh`` (sets up the environment first). ``--keep`` keeps the hub folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import build_hub  # noqa: E402

import flowhub  # noqa: E402
from flowhub.server import GitHubServer  # noqa: E402

REPO = f"{build_hub.OWNER}/{build_hub.REPO}"
os.environ.setdefault("GLOG_minloglevel", "2")  # oneflow's "no CUDA driver" warning is noise on a CPU machine


def banner(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 72 - len(text)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the served folder and the hub cache")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flowhub-demo-"))
    try:
        banner("Publishing the example hub")
        info = build_hub.build(work / "github")
        for tag, sha in info["tags"].items():
            print(f"  {REPO}:{tag} = commit {sha[:12]}, weights {', '.join(info['weights'][tag].values())}")
        with GitHubServer(work / "github") as server:
            os.environ["FLOWHUB_GITHUB_URL"] = server.url
            os.environ["FLOWHUB_GITHUB_API_URL"] = server.api_url
            flowhub.set_dir(work / "hub")
            print(f"  served at {server.url} (API {server.api_url}); hub cache {flowhub.get_dir()}")

            banner(f"flowhub.list({REPO + ':v0.1'!r})")
            print(" ", flowhub.list(f"{REPO}:v0.1", trust_repo=True))

            banner(f"flowhub.help({REPO + ':v0.1'!r}, 'tinynet')")
            print(flowhub.help(f"{REPO}:v0.1", "tinynet"))

            banner(f"flowhub.load({REPO + ':v0.1'!r}, 'tinynet', pretrained=True)")
            model = flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
            import oneflow as flow

            params = sum(p.numel() for p in model.parameters())
            print(f"  loaded {type(model).__name__} with {params} parameters:")
            print("   ", str(model).replace("\n", "\n    "))
            flow.manual_seed(0)
            logits = model.eval()(flow.randn(1, 3, 32, 32))
            print(f"  output for a random 3x32x32 image: class {int(logits.argmax())}, "
                  f"logits {[round(v, 3) for v in logits[0].tolist()[:4]]}...")

            banner("Loading again: everything comes from the cache")
            server.clear_log()
            flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True)
            print(f"  requests made to the server: {len(server.requests)}")

            banner("Two versions side by side in one process (each in its own worker)")
            hub = flowhub.Hub(lockfile=work / "flowhub.lock")
            old = hub.load(f"{REPO}:v0.1", "tinynet", pretrained=True)
            new = hub.load(f"{REPO}:v0.2", "tinynet", pretrained=True)
            print(f"  v0.1 {type(old).__name__}: features.4 = {old.features[4]}")
            print(f"  v0.2 {type(new).__name__}: features.4 = {new.features[4]}")
            print(f"  two distinct classes, each from its own checkout: {type(old) is not type(new)}")

            banner(f"hub.compare({REPO + ':v0.1'!r}, {REPO + ':v0.2'!r}, 'tinynet', pretrained=True)")
            print(hub.compare(f"{REPO}:v0.1", f"{REPO}:v0.2", "tinynet", pretrained=True).format_table())

            banner("The same two loads the reference's way (mode='inprocess')")
            inprocess = flowhub.Hub(mode="inprocess")
            inprocess.load(f"{REPO}:v0.1", "tinynet", pretrained=True, verbose=False)
            try:
                inprocess.load(f"{REPO}:v0.2", "tinynet", pretrained=True, verbose=False)
                print("  loaded (unexpected)")
            except RuntimeError as exc:
                print("  v0.2 fails: its hubconf got v0.1's 'tinymodels' package from sys.modules:")
                print("   ", str(exc).strip().splitlines()[-1].strip()[:110])

            banner("Locked: flowhub.lock pins each commit and weight hash")
            print("  " + (work / "flowhub.lock").read_text().replace("\n", "\n  "))
            print(f"  provenance of the last load: commit {hub.last_provenance.sha[:12]}, "
                  f"weights {[w['file'] for w in hub.last_provenance.weights]}")

            banner("What is in the cache")
            for path in sorted(Path(flowhub.get_dir()).rglob("*")):
                rel = path.relative_to(flowhub.get_dir())
                if rel.parts[0] != ".flowhub" and len(rel.parts) <= 2 and ".flowhub" not in rel.parts:
                    print(f"  {rel}{'/' if path.is_dir() else ''}")
        print("\nDemo finished.")
        return 0
    finally:
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
