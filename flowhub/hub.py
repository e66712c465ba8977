"""``Hub``: the object users hold. It carries settings and runs list / help / load and the downloads.

Explicit constructor arguments win; anything left as ``None`` is read from the environment when a
call is made (see :mod:`flowhub.settings`). The module-level functions in :mod:`flowhub.api` are
thin wrappers over a default ``Hub``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

from flowhub.cache import checkpoints, repos
from flowhub import context, entrypoints, requirements, settings as settings_mod
from flowhub.compare import Comparison, compare_models
from flowhub.errors import MissingModuleError, OverlayImportError, RepoSpecError, RequirementsInstallError
from flowhub.net.http import HttpClient
from flowhub.cache.provenance import Lockfile, Provenance
from flowhub.settings import Settings
from flowhub.spec import RepoSpec, parse_repo_spec
from flowhub.cache.trust import TrustArg


PathLike = Union[str, "os.PathLike[str]"]


class Hub:
    """A model hub with its own settings.

    Args:
        hub_dir: cache folder (default: ``$ONEFLOW_HOME/hub``, ``$XDG_CACHE_HOME/oneflow/hub``, ``~/.cache/oneflow/hub``).
        github_url: web and archive base URL (``FLOWHUB_GITHUB_URL``, default ``https://github.com``).
        github_api_url: API base URL (``FLOWHUB_GITHUB_API_URL``, default ``https://api.github.com``).
        offline: use only the cache, never the network (``FLOWHUB_OFFLINE``).
        timeout: seconds one request may wait for the server (``FLOWHUB_TIMEOUT``, default 10).
        retries: retries of a failed request (``FLOWHUB_RETRIES``, default 2).
        lock_timeout: seconds to wait for another process's download before going on (``FLOWHUB_LOCK_TIMEOUT``).
        mode: ``"inprocess"``, ``"rebuild"`` or ``"proxy"`` (``FLOWHUB_MODE``; default ``"rebuild"``, and
            ``"proxy"`` with a sandbox: ``"rebuild"`` there must be asked for, and warns).
        worker_timeout: seconds one call into a worker may take (``FLOWHUB_WORKER_TIMEOUT``).
        sandbox: run hubconfs in sandboxed workers (``FLOWHUB_SANDBOX``): no network (the caller downloads
            their weights), no token, read-only repo and cache, writes only to a scratch folder, memory and
            process limits. ``list``, ``help`` and ``mode="proxy"`` then need no trust confirmation.
        mock_torch: run torch-style hubconfs on OneFlow through ``oneflow.mock_torch`` (isolated modes).
        lockfile: path of a ``flowhub.lock``: the first load of each repo spec records its commit SHA and
            weight hashes there; later loads use exactly those and fail on any drift.
        install_requirements: install the requirements a repo declares (hubconf ``dependencies``,
            ``requirements.txt``, ``pyproject.toml``, ``setup.cfg``/``setup.py`` ``install_requires``, read
            without running them) that this environment lacks, as wheels, into a cached overlay that only
            the repo's worker sees (``FLOWHUB_INSTALL_REQUIREMENTS``); see :mod:`flowhub.cache.overlays`.
            With ``mode="rebuild"`` such a repo's result is rebuilt here with the overlay's modules imported
            privately, for that result's code only (:mod:`flowhub.cache.overlay_imports`; never in
            ``sys.modules``); if one cannot be imported that way, or the load is sandboxed, it loads in
            proxy mode, with a warning saying why. ``mode="inprocess"`` refuses such a repo.
        cache_shared: in a distributed job, ``"1"``/``True`` if the cache is on a filesystem all nodes share,
            ``"0"``/``False`` if each node has its own, ``"auto"`` to find out (``FLOWHUB_CACHE_SHARED``).
        broadcast_weights: in a job, one rank reads a checkpoint and broadcasts its tensors over OneFlow's
            collectives instead of every rank reading it (``FLOWHUB_BROADCAST_WEIGHTS``; needs the
            checkpoint loaded in the rank's process: ``mode="inprocess"``).
        job_timeout: seconds a rank waits for the rank that fills its cache (``FLOWHUB_JOB_TIMEOUT``).
        deferred_init: in a worker, a load first runs its entrypoint with the random initialisation of
            parameters deferred; when the checkpoint overwrote every one of them (a pretrained load) and
            nothing else drew random numbers, the draws are never made and the cached weights are mapped
            into the parameters' own memory; otherwise the entrypoint runs again the usual way
            (``FLOWHUB_DEFERRED_INIT``, default on; see :mod:`flowhub.worker.proc.deferred`).

    In a job started by ``python -m oneflow.distributed.launch`` (or torchrun), every call is a collective:
    rank 0 resolves the ref and all ranks load that commit; each cache is filled by one rank.

    After each ``load``, ``last_provenance`` says what the load was made of (commit, entrypoint,
    arguments, weight files with their SHA-256, versions). After ``list`` and ``help`` (and a ``load``
    with ``install_requirements``), ``last_requirements`` holds what the repo declares.
    """

    def __init__(self, hub_dir: Optional[PathLike] = None, *, github_url: Optional[str] = None,
                 github_api_url: Optional[str] = None, offline: Optional[bool] = None,
                 timeout: Optional[float] = None, retries: Optional[int] = None,
                 lock_timeout: Optional[float] = None, mode: Optional[str] = None,
                 worker_timeout: Optional[float] = None, sandbox: Optional[bool] = None,
                 mock_torch: bool = False, lockfile: Optional[PathLike] = None,
                 install_requirements: Optional[bool] = None, cache_shared: Union[None, bool, str] = None,
                 broadcast_weights: Optional[bool] = None, job_timeout: Optional[float] = None,
                 deferred_init: Optional[bool] = None) -> None:
        self._overrides = dict(hub_dir=os.fspath(hub_dir) if hub_dir is not None else None,
                               github_url=github_url, github_api_url=github_api_url, offline=offline,
                               timeout=timeout, retries=retries, lock_timeout=lock_timeout, mode=mode,
                               worker_timeout=worker_timeout, sandbox=sandbox,
                               install_requirements=install_requirements, cache_shared=cache_shared,
                               broadcast_weights=broadcast_weights, job_timeout=job_timeout,
                               deferred_init=deferred_init)
        self.mock_torch = mock_torch
        self.lockfile = Lockfile(os.fspath(lockfile)) if lockfile is not None else None
        self.last_provenance: Optional[Provenance] = None
        self.last_requirements: Optional[requirements.RepoRequirements] = None
        self.settings()  # validate the explicit arguments now

    def settings(self) -> Settings:
        """The effective settings, read from the environment now."""
        return settings_mod.resolve(self._overrides)

    def client(self) -> HttpClient:
        """An HTTP client under this hub's settings, read now."""
        return HttpClient(self.settings())

    # -- hub directory ----------------------------------------------------------------------------
    def get_dir(self) -> str:
        """The cache folder this hub uses."""
        return self.settings().hub_dir

    def set_dir(self, d: PathLike) -> None:
        """Use ``d`` (``~`` expanded) as the cache folder from now on."""
        self._overrides["hub_dir"] = os.path.expanduser(os.fspath(d))

    # -- list / help / load -----------------------------------------------------------------------
    def list(self, github: str, force_reload: bool = False, skip_validation: bool = False,
             trust_repo: TrustArg = None, verbose: bool = True) -> List[str]:
        """All public callable entrypoints in the repo's ``hubconf.py``."""
        settings = _in_job(self.settings())
        checkout = self._checkout(settings, parse_repo_spec(github), force_reload, skip_validation, trust_repo,
                                  "list", verbose)
        self.last_requirements = requirements.read(checkout.path)
        return self._run(settings, checkout.path, self._worker_key(checkout), str(checkout.spec), "list",
                         shown=_repo_at(checkout))

    def help(self, github: str, model: str, force_reload: bool = False, skip_validation: bool = False,
             trust_repo: TrustArg = None) -> Optional[str]:
        """The docstring of entrypoint ``model``."""
        settings = _in_job(self.settings())
        checkout = self._checkout(settings, parse_repo_spec(github), force_reload, skip_validation, trust_repo,
                                  "help", True)
        self.last_requirements = requirements.read(checkout.path)
        return self._run(settings, checkout.path, self._worker_key(checkout), str(checkout.spec), "help", model,
                         shown=_repo_at(checkout))

    def load(self, repo_or_dir: str, model: str, *args: Any, source: str = "github", trust_repo: TrustArg = None,
             force_reload: bool = False, verbose: bool = True, skip_validation: bool = False, **kwargs: Any) -> Any:
        """Call entrypoint ``model`` of a GitHub repo (``owner/repo[:ref]``) or a local folder, and return its result."""
        source = source.lower() if isinstance(source, str) else source
        if source not in ("github", "local"):
            raise RepoSpecError(f'Unknown source: "{source}". Allowed values: "github" | "local".')
        weights: List[Dict[str, Any]] = []
        settings = self.settings()  # once per load: every step below sees the same settings
        if source == "github":
            settings = _in_job(settings)
            requested = parse_repo_spec(repo_or_dir)
            checkout = self._checkout(settings, requested, force_reload, skip_validation, trust_repo, "load", verbose)
            result = self._run(settings, checkout.path, self._worker_key(checkout), str(checkout.spec), "load", model,
                               args, kwargs, refresh_weights=force_reload, weights=weights, shown=_repo_at(checkout))
            self.last_provenance = Provenance.of_call(
                f"{requested.owner}/{requested.repo}", requested.ref or checkout.spec.ref, checkout.sha, model, args,
                kwargs, weights)
            if self.lockfile is not None:
                if checkout.sha is None:
                    warnings.warn(f"{repo_or_dir}: the archive carried no commit SHA, so the lockfile cannot pin it.")
                self.lockfile.record(requested, checkout.sha, weights)
            return result
        repo_dir = os.path.abspath(os.path.expanduser(os.fspath(repo_or_dir)))
        if not os.path.isdir(repo_dir):
            raise FileNotFoundError(f"{repo_or_dir} is not a folder; source='local' needs a folder with a hubconf.py.")
        result = self._run(settings, repo_dir, f"local:{os.path.realpath(repo_dir)}", repo_dir, "load", model, args,
                           kwargs, weights=weights)
        self.last_provenance = Provenance.of_call(repo_dir, None, None, model, args, kwargs, weights, source="local")
        return result

    def compare(self, repo_a: str, repo_b: str, model: str, *args: Any, inputs: Any = None,
                trust_repo: TrustArg = None, force_reload: bool = False, skip_validation: bool = False,
                **kwargs: Any) -> Comparison:
        """Load entrypoint ``model`` from two repos (``owner/repo[:ref]`` or local folders) side by side and compare
        entrypoints, parameters and buffers, and outputs for ``inputs`` (guessed from the first layer if omitted).

        Both sides load at once, each in its own worker (``mode="inprocess"`` is upgraded to ``"rebuild"``, since
        two versions of one repo cannot share a process).
        """
        import copy
        from concurrent.futures import ThreadPoolExecutor


        hub = self
        if self.settings().mode == "inprocess":
            hub = copy.copy(self)
            hub._overrides = dict(self._overrides, mode="rebuild")

        def side(repo: str) -> Tuple[List[str], Any]:
            if os.path.isdir(repo):
                repo_dir = os.path.abspath(repo)
                names = hub._run(hub.settings(), repo_dir, f"local:{os.path.realpath(repo_dir)}", repo_dir, "list")
                return names, hub.load(repo_dir, model, *args, source="local", **kwargs)
            names = hub.list(repo, force_reload=force_reload, skip_validation=skip_validation, trust_repo=trust_repo)
            return names, hub.load(repo, model, *args, trust_repo=trust_repo, skip_validation=skip_validation, **kwargs)

        in_job = settings_mod.job_variables().get("WORLD_SIZE", "1") != "1"  # collectives: same order on all ranks
        with ThreadPoolExecutor(max_workers=1 if in_job else 2) as pool:
            (names_a, obj_a), (names_b, obj_b) = pool.map(side, (repo_a, repo_b))
        result = Comparison(a=repo_a, b=repo_b, entrypoint=model,
                            entrypoints_added=sorted(set(names_b) - set(names_a)),
                            entrypoints_removed=sorted(set(names_a) - set(names_b)))
        return compare_models(obj_a, obj_b, result, inputs)

    def _checkout(self, settings: Settings, spec: RepoSpec, force_reload: bool, skip_validation: bool,
                  trust_repo: TrustArg, calling_fn: str, verbose: bool) -> repos.Checkout:
        pinned = self.lockfile.pinned_sha(spec) if self.lockfile is not None else None
        if settings.job_role and pinned is None:  # a rank of a job: every rank loads rank 0's commit
            from flowhub.distributed import coordinate  # delayed: only in a job

            return coordinate.checkout(settings, spec, force_reload=force_reload, skip_validation=skip_validation,
                                       trust_repo=trust_repo, calling_fn=calling_fn, verbose=verbose,
                                       untrusted_ok=_untrusted_ok(settings, calling_fn))
        return repos.get_checkout(HttpClient(settings), spec, force_reload=force_reload,
                                  skip_validation=skip_validation, trust_repo=trust_repo, calling_fn=calling_fn,
                                  verbose=verbose, pinned_sha=pinned, untrusted_ok=_untrusted_ok(settings, calling_fn))

    def _worker_key(self, checkout: repos.Checkout) -> str:
        spec = checkout.spec
        return f"{spec.key}@{checkout.sha or spec.ref}:{os.path.realpath(checkout.path)}"

    def _run(self, settings: Settings, repo_dir: str, key: str, label: str, op: str, model: Optional[str] = None,
             args: tuple = (), kwargs: Optional[dict] = None, refresh_weights: bool = False,
             weights: Optional[List[Dict[str, Any]]] = None, shown: Optional[str] = None) -> Any:
        """Run list/help/load where the mode says, with the repo's requirement overlay if asked for; a module
        missing in repo code becomes a :class:`~flowhub.errors.MissingModuleError` (``shown``: repo@ref)."""
        extra: List[str] = []
        overlay: Optional[Any] = None  # the overlay's private importer, for a result rebuilt here
        if settings.install_requirements:
            from flowhub.cache import overlays  # delayed: only overlays need the installer machinery

            if settings.mode != "inprocess":  # the zygote imports oneflow while the plan is made
                from flowhub.worker.host.pool import get_manager

                manager = get_manager()
                (manager.sandbox_host() if settings.sandbox else manager).prewarm()
            plan = overlays.plan(settings, repo_dir, label, provided=("torch",) if self.mock_torch else ())
            self.last_requirements, extra = plan.declared, plan.sys_path
            if plan.overlay is not None:
                settings, overlay = _overlay_settings(settings, label, op, plan.overlay.site)
                key = f"{key}+overlay:{plan.overlay.key}"
        try:
            try:
                return self._dispatch(settings, repo_dir, key, label, op, model, args, kwargs, refresh_weights,
                                      weights, extra, overlay)
            except OverlayImportError as exc:
                if overlay is None:
                    raise
                warnings.warn(f"{label}: the result could not be rebuilt in this process: {exc}. It was loaded "
                              'again in proxy mode (mode="proxy"): the model stays in the worker and is used '
                              "through a proxy.", stacklevel=3)
                return self._dispatch(dataclasses.replace(settings, mode="proxy"), repo_dir, key, label, op, model,
                                      args, kwargs, refresh_weights, weights, extra, None)
        except MissingModuleError:
            raise
        except ModuleNotFoundError as exc:
            raise requirements.missing_module_error(exc, shown or label, op, model, repo_dir,
                                                    settings.install_requirements, self.mock_torch) from exc

    def _dispatch(self, settings: Settings, repo_dir: str, key: str, label: str, op: str, model: Optional[str],
                  args: tuple, kwargs: Optional[dict], refresh_weights: bool,
                  weights: Optional[List[Dict[str, Any]]], extra_sys_path: List[str],
                  overlay: Optional[Any] = None) -> Any:
        expected = self.lockfile.expected_weights() if self.lockfile is not None else None
        if settings.sandbox and settings.mode == "inprocess":
            raise ValueError('sandbox=True (FLOWHUB_SANDBOX) needs a worker: use mode="proxy" or "rebuild", '
                             'not "inprocess"')
        mode = "proxy" if settings.sandbox and op != "load" else settings.mode  # JSON-only replies
        if settings.sandbox and mode == "rebuild":
            warnings.warn(
                f"{label}: sandbox=True with mode='rebuild' rebuilds the sandboxed repository's result in this "
                "process: its pickled classes and their methods (forward included) run here, outside the sandbox. "
                "Use it only for repositories you trust; the sandbox's default, mode='proxy', keeps the result "
                "in the worker.", stacklevel=3)
        if settings.mode == "inprocess":
            with context.serving(settings, refresh_weights, expected) as used:
                try:
                    return entrypoints.run_in_process(repo_dir, op, model, args, kwargs)
                finally:
                    if weights is not None:
                        weights.extend(used)
        from flowhub.worker.host.pool import get_manager

        return get_manager().call(repo_dir=repo_dir, key=key, op=op, model=model,
                                  args=tuple(args), kwargs=dict(kwargs or {}), mode=mode, sandbox=settings.sandbox,
                                  settings=context.CallSettings(settings, refresh_weights, expected),
                                  timeout=settings.worker_timeout, label=label, mock_torch=self.mock_torch,
                                  weights=weights, extra_sys_path=extra_sys_path, overlay=overlay)

    # -- downloads ----------------------------------------------------------------------------------
    def download_url_to_file(self, url: str, dst: PathLike, hash_prefix: Optional[str] = None,
                             progress: bool = True) -> None:
        """Download ``url`` to ``dst`` (atomically, resumably, verified against ``hash_prefix`` if given)."""
        context.download_url_to_file(url, dst, hash_prefix, progress, settings=self.settings())

    def load_state_dict_from_url(self, url: str, model_dir: Optional[PathLike] = None, map_location: Any = None,
                                 progress: bool = True, check_hash: bool = False,
                                 file_name: Optional[str] = None, weights_only: bool = False) -> Any:
        """Download (once) and ``oneflow.load`` the checkpoint at ``url``; zipped checkpoint folders are extracted once,
        torch (``.pth``, zip or legacy) and ``.safetensors`` files are read without torch, mapped zero-copy.

        ``weights_only=True``: unpickle it in a sandboxed worker and return only its tensors and plain
        values (see :meth:`load_weights`).
        """
        return context.load_state_dict_from_url(url, model_dir, map_location, progress, check_hash, file_name,
                                                weights_only, settings=self.settings())

    def load_weights(self, path: PathLike, map_location: Any = None, weights_only: bool = True) -> Any:
        """Load a local checkpoint (a oneflow checkpoint folder, a file, or a zip of a folder; a torch
        ``.pth``/``.pt`` or a ``.safetensors`` file).

        Torch and safetensors files are read here by flowhub's allow-list readers, which run nothing
        from the file (:mod:`flowhub.formats`), whatever ``weights_only`` says. For the others,
        ``weights_only=True`` (the default): the checkpoint's pickle, which can run any code, is
        unpickled in a one-shot sandboxed worker that may read only the checkpoint; only tensors and
        plain values (numbers, strings, None, bytes, devices, dtypes, and lists, tuples and dicts of
        them) come back, as JSON plus raw bytes validated here and mapped without a copy. Anything else
        raises :class:`~flowhub.errors.WeightsOnlyError`. ``weights_only=False`` is ``oneflow.load``
        in this process (for checkpoints you trust). ``worker_timeout`` bounds the sandboxed load.
        """
        settings = self.settings()
        if not weights_only:
            return checkpoints.load_checkpoint(os.fspath(path), map_location, settings.lock_timeout)
        return _load_weights_only(path, map_location, settings)


def _repo_at(checkout: repos.Checkout) -> str:
    """``owner/repo@ref`` (and its commit), as errors name a checkout."""
    spec = checkout.spec
    return f"{spec.owner}/{spec.repo}@{spec.ref}" + (f" (commit {checkout.sha[:12]})" if checkout.sha else "")


def _overlay_settings(settings: Settings, label: str, op: str, site: str) -> Tuple[Settings, Optional[Any]]:
    """The settings of a call whose repo needs an overlay (at ``site``), and the private importer a rebuilt
    result imports the overlay's modules through (this process's environment stays as it is).

    Never in this process. A rebuild-mode load stays one when every top-level package of the overlay
    imports privately here (checked now, once per overlay and process); otherwise, and for a sandboxed
    load, it loads in proxy mode with a warning saying why."""
    if settings.mode == "inprocess":
        raise RequirementsInstallError(
            f"{label} needs requirements this environment lacks; install_requirements puts them in an overlay "
            'that only a worker sees, so it cannot load with mode="inprocess": use mode="proxy" (or install '
            "them into this environment).")
    if op != "load" or settings.mode != "rebuild":
        return settings, None
    if settings.sandbox:
        why = "its requirements are installed in an overlay that only its sandboxed worker sees"
    else:
        from flowhub.cache import overlay_imports  # delayed: only overlays need it

        try:
            importer = overlay_imports.for_site(site)
            importer.preload()
            return settings, importer
        except OverlayImportError as exc:
            why = f"its requirements are installed in an overlay, and {exc}"
    warnings.warn(f"{label}: {why}, so it loads in proxy mode (mode=\"proxy\"): the model stays in the worker "
                  "and is used through a proxy. Install the requirements into this environment to rebuild it "
                  "here.", stacklevel=4)
    return dataclasses.replace(settings, mode="proxy"), None


def _in_job(settings: Settings) -> Settings:
    """``settings`` with this rank's role in its job's cache; unchanged (and nothing imported) outside a job."""
    variables = settings_mod.job_variables()
    if not variables or variables.get("WORLD_SIZE") == "1":  # ``import oneflow`` sets WORLD_SIZE=1 outside jobs
        return settings
    from flowhub.distributed import coordinate  # delayed: only in a job (it may bring OneFlow's comm up)

    return coordinate.job_settings(settings)


def _untrusted_ok(settings: Settings, op: str) -> bool:
    """With a sandbox, untrusted code may run without a trust confirmation wherever nothing it
    returns is unpickled here: list, help and proxy mode. Rebuild mode re-creates the repo's
    objects (its code) in this process, so there the reference's trust rules stay."""
    return settings.sandbox and (op != "load" or settings.mode == "proxy")


def _load_weights_only(path: PathLike, map_location: Any, settings: Settings) -> Any:
    from flowhub.worker.host import weights_only  # delayed: it starts worker machinery on first use

    return weights_only.load(path, map_location, lock_timeout=settings.lock_timeout, timeout=settings.worker_timeout)


context.set_weights_only_loader(_load_weights_only)
