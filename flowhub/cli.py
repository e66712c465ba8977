"""The ``flowhub`` command (also ``python -m flowhub``): the hub API for shell users.

Exit codes: 0 success, 1 a flowhub error (message on stderr, no traceback), 2 bad usage.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from flowhub.cache import trust
from flowhub.errors import FlowhubError
from flowhub.hub import Hub
from flowhub.spec import parse_repo_spec
from flowhub.units import human_size, parse_age, parse_size


def _value(text: str) -> Any:
    """A command-line value: a Python literal if it parses as one (``3``, ``True``, ``[1, 2]``), else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _call_args(items: List[str]) -> Tuple[tuple, Dict[str, Any]]:
    """``a 3 key=value`` → positional and keyword arguments for an entrypoint."""
    args: List[Any] = []
    kwargs: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if sep and key.isidentifier():
            kwargs[key] = _value(raw)
        else:
            args.append(_value(item))
    return tuple(args), kwargs


def _hub(args: argparse.Namespace) -> Hub:
    return Hub(hub_dir=args.hub_dir, offline=True if args.offline else None, mode=getattr(args, "mode", None),
               install_requirements=True if getattr(args, "install_requirements", False) else None)


def _trust_arg(args: argparse.Namespace) -> trust.TrustArg:
    return True if args.trust else "check"


def _declared(hub: Hub) -> str:
    reqs = hub.last_requirements
    return "requirements the repository declares:\n  " + (reqs.describe() if reqs else "(unknown)").replace("\n", "\n  ")


def cmd_list(args: argparse.Namespace) -> int:
    hub = _hub(args)
    for name in hub.list(args.repo, force_reload=args.force_reload, skip_validation=args.skip_validation,
                         trust_repo=_trust_arg(args), verbose=not args.quiet):
        print(name)
    if not args.quiet:  # on stderr: stdout stays one entrypoint per line
        print(_declared(hub), file=sys.stderr)
    return 0


def cmd_help(args: argparse.Namespace) -> int:
    hub = _hub(args)
    doc = hub.help(args.repo, args.entrypoint, force_reload=args.force_reload,
                   skip_validation=args.skip_validation, trust_repo=_trust_arg(args))
    print(doc if doc is not None else f"({args.entrypoint} has no docstring)")
    print("\n" + _declared(hub))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    call_args, call_kwargs = _call_args(args.args)
    source = "local" if os.path.isdir(args.repo) else "github"
    obj = _hub(args).load(args.repo, args.entrypoint, *call_args, source=source, trust_repo=_trust_arg(args),
                          force_reload=args.force_reload, verbose=not args.quiet,
                          skip_validation=args.skip_validation, **call_kwargs)
    print(summarize(obj, args.input_shape))
    return 0


def summarize(obj: Any, input_shape: Optional[str] = None) -> str:
    """A short description of what an entrypoint returned; runs a sample input through a module if asked."""
    try:
        import oneflow as flow
        import oneflow.nn as nn
    except ImportError:  # pragma: no cover - oneflow is a dependency
        return repr(obj)
    from flowhub.worker.host.proxy import Proxy, remote_isinstance, remote_type

    proxied = isinstance(obj, Proxy)
    if not (isinstance(obj, nn.Module) or (proxied and remote_isinstance(obj, nn.Module))):
        text = repr(obj)
        return f"{type(obj).__name__}: {text if len(text) < 2000 else text[:2000] + '...'}"
    n_params = sum(p.numel() for p in obj.parameters())
    n_tensors = len(obj.state_dict())
    name = f"{remote_type(obj)} (proxy: it stays in its worker)" if proxied else type(obj).__name__
    lines = [f"{name}: {n_params:,} parameters in {n_tensors} tensors", repr(obj) if proxied else str(obj)]
    if input_shape:
        shape = _shape(input_shape)
        flow.manual_seed(0)
        with flow.no_grad():
            out = obj.eval()(flow.randn(*shape))
        lines.append(f"output for a random input of shape {shape}: shape {tuple(out.shape)}, "
                     f"mean {float(out.mean()):.6g}")
    return "\n".join(lines)


def _shape(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.lower().replace("x", ",").split(",") if x.strip())


def cmd_compare(args: argparse.Namespace) -> int:
    call_args, call_kwargs = _call_args(args.args)
    inputs = None
    if args.input_shape:
        import oneflow as flow

        flow.manual_seed(0)
        inputs = (flow.randn(*_shape(args.input_shape)),)
    result = _hub(args).compare(args.repo_a, args.repo_b, args.entrypoint, *call_args, inputs=inputs,
                                trust_repo=_trust_arg(args), skip_validation=args.skip_validation, **call_kwargs)
    print(json.dumps(result.as_dict(), indent=1) if args.json else result.format_table())
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    call_args, call_kwargs = _call_args(args.args)
    hub = Hub(hub_dir=args.hub_dir, offline=True if args.offline else None, mode=args.mode, lockfile=args.lockfile,
              install_requirements=True if args.install_requirements else None)
    hub.load(args.repo, args.entrypoint, *call_args, trust_repo=_trust_arg(args), force_reload=args.force_reload,
             verbose=not args.quiet, skip_validation=args.skip_validation, **call_kwargs)
    prov = hub.last_provenance
    print(json.dumps(prov.as_dict(), indent=1) if args.json else
          f"locked {args.repo} at {prov.sha} with {len(prov.weights)} weight file(s) in {hub.lockfile.path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from flowhub.cache import checkpoints, repos
    from flowhub.cache.provenance import Lockfile, check_weight
    from flowhub.spec import parse_repo_spec as parse

    lock = Lockfile(args.lockfile)
    if not os.path.exists(lock.path):
        print(f"flowhub: error: no lockfile at {lock.path}", file=sys.stderr)
        return 1
    data = lock.read()
    hub = _hub(args)
    client = hub.client()
    failures = 0
    for key, entry in sorted(data["repos"].items()):
        try:
            checkout = repos.get_checkout(client, parse(key), trust_repo=True, verbose=False, pinned_sha=entry["sha"])
            print(f"ok       {key} = {entry['sha'][:12]} ({checkout.path})")
        except (FlowhubError, ValueError, RuntimeError) as exc:
            failures += 1
            print(f"FAILED   {key}: {exc}")
    for url, expected in sorted(data["weights"].items()):
        try:
            folder = os.path.join(hub.get_dir(), "checkpoints")
            path = checkpoints.fetch_weights(client, url, folder, progress=False)
            fp = checkpoints.fingerprint(folder, os.path.basename(path), url)
            check_weight(url, fp["sha256"], fp["size"], expected)
            print(f"ok       {url} sha256 {fp['sha256'][:12]}")
        except (FlowhubError, ValueError, RuntimeError) as exc:
            failures += 1
            print(f"FAILED   {url}: {exc}")
    print(f"{len(data['repos'])} repos and {len(data['weights'])} weight files checked, {failures} failed")
    return 1 if failures else 0


def cmd_download(args: argparse.Namespace) -> int:
    hub = _hub(args)
    if args.output:
        hub.download_url_to_file(args.url, args.output, hash_prefix=args.hash_prefix, progress=not args.quiet)
        print(os.path.abspath(args.output))
    else:
        from flowhub.cache import checkpoints

        folder = args.model_dir or os.path.join(hub.get_dir(), "checkpoints")
        path = checkpoints.fetch_weights(hub.client(), args.url, folder, progress=not args.quiet,
                                         check_hash=args.check_hash, file_name=args.file_name)
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flowhub.server.__main__ import main as serve_main

    argv = [args.root, "--host", args.host, "--port", str(args.port)] + (["-v"] if args.verbose else [])
    return serve_main(argv)


def cmd_trust(args: argparse.Namespace) -> int:
    hub_dir = _hub(args).get_dir()
    if args.action == "ls":
        for name in sorted(trust.read_trusted(hub_dir)):
            print(name)
        return 0
    spec = parse_repo_spec(args.repo)
    if args.action == "add":
        trust.add_trusted(hub_dir, spec)
    else:
        trust.remove_trusted(hub_dir, spec)
    return 0


def doctor_info(hub_dir: Optional[str] = None) -> Dict[str, Any]:
    """What ``flowhub doctor`` reports: versions, the hub folder, and the sandbox this machine gives
    a worker, measured by :func:`flowhub.sandbox.probe` in a throwaway child process."""
    import platform

    from flowhub._version import __version__
    from flowhub import sandbox
    from flowhub.cache.provenance import oneflow_version
    from flowhub.settings import SandboxLimits as Limits

    hub = Hub(hub_dir=hub_dir)
    settings = hub.settings()
    try:
        worker_limits: Optional[Limits] = Limits.from_env()
        limits: Any = worker_limits.describe()
    except ValueError as exc:
        worker_limits, limits = None, f"invalid: {exc}"
    # the very policy a sandboxed worker gets (limits included), applied in a throwaway child
    options = worker_limits.policy_options() if worker_limits is not None else {}
    report = sandbox.probe(sandbox.SandboxPolicy.for_worker(settings.hub_dir, "/nonexistent-scratch", **options))
    from flowhub.worker.host import service

    zygote = service.zygote_report()
    return {"zygote": zygote, "zygote_report": service.describe_report(zygote), "flowhub": __version__, "python": platform.python_version(), "executable": sys.executable,
            "oneflow": oneflow_version(), "platform": platform.platform(), "uid": os.getuid(),
            "hub_dir": settings.hub_dir, "mode": settings.mode, "sandbox_enabled": settings.sandbox,
            "sandbox_limits": limits, "sandbox": report.as_dict(), "report": sandbox.format_report(report),
            "job": _job_view(settings)}


def _job_view(settings: Any) -> Dict[str, Any]:
    from flowhub.distributed.view import job_view  # delayed: only doctor needs it; it starts no comm

    return job_view(settings)


def cmd_doctor(args: argparse.Namespace) -> int:
    info = doctor_info(args.hub_dir)
    if args.json:
        info.pop("report")
        info.pop("zygote_report")
        print(json.dumps(info, indent=1))
        return 0
    for key in ("flowhub", "python", "executable", "oneflow", "platform", "uid", "hub_dir", "mode",
                "sandbox_enabled"):
        print(f"{key + ':':<17} {info[key]}")
    print(info["zygote_report"])
    limits = info["sandbox_limits"]
    if isinstance(limits, dict):
        print("sandbox limits (per worker; value, then how it is enforced):")
        width = max(len(k) for k in limits)
        for name, text in limits.items():
            print(f"  {name:<{width}}  {text}")
    else:
        print(f"sandbox limits:   {limits}")
    print(info["report"])
    job = info["job"]
    if job["in_job"]:
        print(f"job:             rank {job['rank']} of {job['world_size']} (local rank {job['local_rank']}, "
              f"node {job['node_rank']}) on {job['host']}, master {job['master']}")
    else:
        print("job:             none (no launcher variables)" if not job["variables"] else
              f"job:             none: {job.get('warning', '')}")
    print(f"job cache:       {job['cache']}")
    print(f"job comm:        {job['comm']}")
    return 0


def _file_name(text: str) -> str:
    from flowhub.cache.checkpoints import check_file_name

    return check_file_name(text, "--file-name")


def _argtype(parse):
    """An argparse type from a ``units`` parser (its ValueError becomes a usage error)."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _print_entries(entries, as_json: bool) -> None:
    import time

    if as_json:
        print(json.dumps([e.as_dict() for e in entries], indent=1))
        return
    if not entries:
        print("(the cache is empty)")
        return
    print(f"{'KIND':<8} {'SIZE':>10} {'LAST USED':<16} {'NAME':<44} {'SHA':<12} SOURCE")
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
        print(f"{e.kind:<8} {human_size(e.size):>10} {used:<16} {e.name:<44} {e.sha[:12]:<12} {e.source}"
              + (f"  !! {e.problem}" if e.problem else ""))


def cmd_cache(args: argparse.Namespace) -> int:
    from flowhub.cache import inventory

    hub_dir = _hub(args).get_dir()
    if args.action == "ls":
        _print_entries(inventory.scan(hub_dir), args.json)
        return 0
    if args.action == "verify":
        checked = inventory.verify(hub_dir)
        bad = [e for e in checked if e.problem]
        _print_entries(checked, args.json)
        if not args.json:
            print(f"{len(checked)} entries checked, {len(bad)} corrupt"
                  + ("; remove them with 'flowhub cache prune --corrupt'" if bad else ""))
        return 1 if bad else 0
    entries = inventory.scan(hub_dir)
    chosen = inventory.select_for_pruning(entries, args.older_than, args.max_size)
    if args.corrupt:
        chosen += [e for e in inventory.verify(hub_dir, entries) if e.problem and e not in chosen]
    leftovers = inventory.stale_temporaries(hub_dir)
    verb = "would remove" if args.dry_run else "removed"
    for e in chosen:
        if not args.dry_run:
            inventory.remove(hub_dir, e)
        print(f"{verb} {e.kind} {e.name} ({human_size(e.size)})")
    for path in leftovers:
        if not args.dry_run:
            from flowhub.cache import store

            store.remove_tree(path)
        print(f"{verb} leftover {path}")
    print(f"{verb} {len(chosen)} entries, {human_size(sum(e.size for e in chosen))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowhub", description="Load models published through hubconf.py "
                                     "(a drop-in oneflow.hub with a shared, verified cache).")
    parser.add_argument("--hub-dir", help="hub cache folder (default: $ONEFLOW_HOME/hub or ~/.cache/oneflow/hub)")
    parser.add_argument("--offline", action="store_true", help="use only the cache (like FLOWHUB_OFFLINE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def repo_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("repo", help="owner/repo[:ref] (or a local folder for 'load')")
        p.add_argument("--trust", action="store_true", help="trust the repository (added to trusted_list)")
        p.add_argument("--force-reload", action="store_true", help="download the repository again")
        p.add_argument("--skip-validation", action="store_true", help="do not check the ref with the GitHub API")
        p.add_argument("-q", "--quiet", action="store_true", help="no cache messages or progress bars")
        p.add_argument("--mode", choices=("inprocess", "rebuild", "proxy"), help="where hubconf code runs")
        p.add_argument("--install-requirements", action="store_true",
                       help="install the repository's declared requirements that this environment lacks, as wheels, "
                       "into an overlay only its worker sees (like FLOWHUB_INSTALL_REQUIREMENTS=1)")
        return p

    p = repo_command("list", "list the entrypoints of a repository")
    p.set_defaults(func=cmd_list)
    p = repo_command("help", "show an entrypoint's docstring")
    p.add_argument("entrypoint")
    p.set_defaults(func=cmd_help)
    p = repo_command("load", "build a model (or other object) and print a summary")
    p.add_argument("entrypoint")
    p.add_argument("args", nargs="*", help="entrypoint arguments: values or key=value (Python literals)")
    p.add_argument("--input-shape", help="run a random input of this shape through the model, e.g. 1x3x224x224")
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("compare", help="load two versions side by side and report what differs",
                       description="Compare an entrypoint of two repos (owner/repo:ref or local folders): entrypoints, "
                       "parameters and buffers, and outputs for a random input.")
    p.add_argument("repo_a")
    p.add_argument("repo_b")
    p.add_argument("entrypoint")
    p.add_argument("args", nargs="*", help="entrypoint arguments: values or key=value (Python literals)")
    p.add_argument("--input-shape", help="shape of the random input, e.g. 1x3x224x224 (default: guessed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--trust", action="store_true", help="trust both repositories")
    p.add_argument("--skip-validation", action="store_true", help="do not check the refs with the GitHub API")
    p.add_argument("--mode", choices=("rebuild", "proxy"), help="how models come back from their workers")
    p.set_defaults(func=cmd_compare)

    p = repo_command("lock", "load a model and pin its commit and weight hashes in a lockfile")
    p.add_argument("entrypoint")
    p.add_argument("args", nargs="*", help="entrypoint arguments: values or key=value (Python literals)")
    p.add_argument("--lockfile", default="flowhub.lock", help="lockfile path (default ./flowhub.lock)")
    p.add_argument("--json", action="store_true", help="print the load's provenance as JSON")
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("verify", help="check that everything a lockfile pins is available and unchanged")
    p.add_argument("--lockfile", default="flowhub.lock", help="lockfile path (default ./flowhub.lock)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("download", help="download a file into the hub cache (or to --output)")
    p.add_argument("url")
    p.add_argument("-o", "--output", help="write to this path instead of the checkpoints cache")
    p.add_argument("--model-dir", help="cache folder (default <hub>/checkpoints)")
    p.add_argument("--file-name", type=_argtype(_file_name),
                   help="name of the cached file, without any folder (default: from the URL)")
    p.add_argument("--check-hash", action="store_true", help="verify the hash prefix in the file name")
    p.add_argument("--hash-prefix", help="expected SHA-256 prefix (with --output)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("serve", help="serve git repositories and files as a GitHub-compatible server")
    p.add_argument("root", help="folder of <owner>/<repo>.git repositories and files")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cache", help="list, verify or prune the hub cache")
    p.add_argument("action", choices=("ls", "verify", "prune"))
    p.add_argument("--json", action="store_true", help="print JSON (ls, verify)")
    p.add_argument("--older-than", type=_argtype(parse_age), help="prune: entries unused for this long (30d, 12h, 2w)")
    p.add_argument("--max-size", type=_argtype(parse_size), help="prune: least recently used entries until the cache fits (e.g. 10G)")
    p.add_argument("--corrupt", action="store_true", help="prune: entries that fail verification")
    p.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("doctor", help="show versions, the hub folder and how strong the worker sandbox is here",
                       description="Print Python, oneflow and flowhub versions, the hub folder, and the sandbox "
                       "a worker gets on this machine (each mechanism, what it protects, and a few denied actions "
                       "tried in a throwaway child process).")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("trust", help="show or change the trusted repositories")
    p.add_argument("action", choices=("ls", "add", "rm"))
    p.add_argument("repo", nargs="?", help="owner/repo (for add and rm)")
    p.set_defaults(func=cmd_trust)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "trust" and args.action != "ls" and not args.repo:
        parser.error(f"trust {args.action} needs owner/repo")
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # also the bars of downloads a hubconf makes (workers inherit it)
    try:
        return args.func(args)
    except (FlowhubError, ValueError, RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"flowhub: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
