"""Downloads made by the caller on a sandboxed worker's behalf (the worker has no network).

A sandboxed hubconf's ``load_state_dict_from_url`` / ``download_url_to_file`` arrive as ``fetch``
requests during a call. They are made here, through the caller's settings (without the GitHub
token), locks, progress bars and lockfile expectations, only for plain http(s) URLs on the configured
endpoints' hosts (and those in ``FLOWHUB_SANDBOX_ALLOWED_HOSTS``), every redirect hop checked, within
the call's quota of files and bytes (zip extraction included, at most ``SANDBOX_MAX_EXTRACT_RATIO``
times a zip's size). A weight file already in ``<hub>/checkpoints`` is shared (read-only); a new one
is cached in ``<hub>/checkpoints/.sandboxed/``, never where a trusted load looks (weights are cached
by file name, so an untrusted hubconf could otherwise plant a pickle that a later trusted load runs);
``download_url_to_file`` lands in the worker's inbox.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from typing import Any, Dict, List, Tuple
from urllib.parse import urlsplit

from flowhub import units
from flowhub.cache import checkpoints, store
from flowhub.cache.archive import check_expansion
from flowhub.cache.checkpoints import SANDBOXED_DIR
from flowhub.cache.provenance import check_weight
from flowhub.context import CallSettings
from flowhub.net import urls
from flowhub.net.download import download
from flowhub.net.http import HttpClient
from flowhub.settings import (ENV_SANDBOX_ALLOWED_HOSTS, ENV_SANDBOX_MAX_DOWNLOAD_BYTES, ENV_SANDBOX_MAX_DOWNLOADS,
                              SANDBOX_MAX_EXTRACT_RATIO, SandboxLimits, sandbox_extra_hosts)


def allowed_hosts(settings: Any) -> List[str]:
    """Hosts a sandboxed hubconf may have the caller fetch from: the configured GitHub endpoints, plus
    ``FLOWHUB_SANDBOX_ALLOWED_HOSTS``. A bare ``host`` stands for the default ports (80, 443) only; see
    :func:`flowhub.net.urls.allows`."""
    hosts = []
    for endpoint in (settings.github_url, settings.github_api_url):
        try:
            hosts.append(urls.authority(endpoint))
        except ValueError:  # not an http(s) URL: nothing can be fetched from it anyway
            pass
    return hosts + sandbox_extra_hosts()


def check_allowed_host(url: str, settings: Any) -> None:
    """Refuse (``PermissionError``) a URL a sandboxed hubconf asked for unless it is a plain http(s) URL
    on an allowed host, as the HTTP client will parse it (:func:`flowhub.net.urls.check_allowed`)."""
    allowed = allowed_hosts(settings)
    try:
        urls.check_allowed(url, allowed)
    except PermissionError as exc:
        raise PermissionError(
            f"a sandboxed hubconf's fetch was refused: {exc}. The caller fetches only plain http(s) URLs "
            f"(no credentials, backslashes or spaces) from the configured endpoints ({', '.join(allowed)}); "
            f"to allow another host, add it to {ENV_SANDBOX_ALLOWED_HOSTS} (comma-separated host or host:port; "
            "'*' allows any).") from None


@dataclasses.dataclass
class _Quota:
    """What one call of a sandboxed worker may still have the caller fetch (files, bytes), kept in the
    call's state; a fetch over it raises :class:`PermissionError`, which the hubconf sees."""

    limits: SandboxLimits
    files: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, state: dict, limits: SandboxLimits) -> "_Quota":
        quota = state.get("quota")
        if quota is None:
            quota = state["quota"] = cls(limits)
        return quota

    def left(self) -> int:
        return max(self.limits.max_download_bytes - self.bytes, 0)

    def take_file(self, url: str) -> None:
        self.files += 1
        if self.files > self.limits.max_downloads:
            raise PermissionError(f"a sandboxed hubconf asked for more than {self.limits.max_downloads} downloads "
                                  f"in one call ({url!r:.200} refused; {ENV_SANDBOX_MAX_DOWNLOADS})")

    def take_bytes(self, size: int, url: str) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_download_bytes:
            raise PermissionError(f"the downloads of one sandboxed call passed {units.human_size(self.limits.max_download_bytes)} "
                                  f"with {url!r:.200} ({ENV_SANDBOX_MAX_DOWNLOAD_BYTES})")


def _plain_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"{what} {name!r:.80} is not a plain file name")
    return name


def fetch(header: dict, call: CallSettings, state: dict, inbox: str, limits: SandboxLimits) -> dict:
    """Make one download a sandboxed worker asked for during a call made with ``call`` (see the module
    docstring); ``state`` lives as long as the call, ``inbox`` is the worker's read-only folder for plain
    downloads."""
    url = header.get("url")
    if not isinstance(url, str) or len(url) > 16384 or urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"a sandboxed worker may have http(s) URLs fetched, not {str(url)!r:.200}")
    settings = dataclasses.replace(call.settings, github_token=None)
    check_allowed_host(url, settings)
    client = HttpClient(settings, allow_url=lambda hop: check_allowed_host(hop, settings))
    quota = _Quota.of(state, limits)
    quota.take_file(url)
    progress = header.get("progress") is not False
    if header.get("kind") == "weights":
        path, fingerprint = _weights(client, header, url, call, state, quota, progress)
    else:
        path, fingerprint = _file(client, header, url, inbox, quota, progress)
    check_weight(url, fingerprint.get("sha256"), fingerprint.get("size"), (call.expected_weights or {}).get(url))
    return {"path": path, "fingerprint": fingerprint}


def _weights(client: HttpClient, header: dict, url: str, call: CallSettings, state: dict, quota: _Quota,
             progress: bool) -> Tuple[str, Dict[str, Any]]:
    """A checkpoint: shared if a trusted load cached it, else fetched into ``.sandboxed/``; extracted here."""
    settings = client.settings
    shared = os.path.join(settings.hub_dir, "checkpoints")
    requested = header.get("model_dir")
    if requested is not None and (not isinstance(requested, str)
                                  or os.path.realpath(requested) != os.path.realpath(shared)):
        warnings.warn(f"flowhub: a sandboxed hubconf asked for weights in {str(requested)!r:.200}; "
                      f"sandboxed downloads are cached in {os.path.join(shared, SANDBOXED_DIR)}.", stacklevel=3)
    name = _plain_name(header.get("file_name") or os.path.basename(urlsplit(url).path), "the weight file name")
    if name.startswith(".") or name.endswith(checkpoints.EXTRACTED_SUFFIX):
        raise ValueError(f"the weight file name {name!r:.80} is reserved")
    if not call.refresh_weights and checkpoints.cached_file_ok(shared, name):
        folder = shared  # cached by a trusted load: shared, read-only (the reference's by-name cache)
        cached = os.path.join(shared, name)
    else:  # never where a trusted load would look: no planting a file it would unpickle
        folder = os.path.join(shared, SANDBOXED_DIR)
        refreshed = state.setdefault("refreshed", set())

        def refresh(path: str) -> bool:
            if not call.refresh_weights or path in refreshed:
                return False
            refreshed.add(path)
            return True

        cached = checkpoints.fetch_weights(client, url, folder, progress=progress,
                                           check_hash=header.get("check_hash") is True, file_name=name,
                                           refresh=refresh, max_bytes=quota.left())
    if not store.inside(cached, [settings.hub_dir]):
        raise ValueError(f"refusing to hand {cached} to a sandboxed worker: it is outside the hub folder")
    quota.take_bytes(os.path.getsize(cached), url)
    if zipfile.is_zipfile(cached):  # the worker cannot write the extracted folder itself
        with zipfile.ZipFile(cached) as zf:  # a zip bomb is refused before a byte is written
            expands = check_expansion(zf.infolist(), cached, quota.left(), SANDBOX_MAX_EXTRACT_RATIO)
        quota.take_bytes(expands, url)
        checkpoints.extracted_checkpoint(cached, settings.lock_timeout)
    return cached, checkpoints.fingerprint(folder, os.path.basename(cached), url)


def _file(client: HttpClient, header: dict, url: str, inbox: str, quota: _Quota,
          progress: bool) -> Tuple[str, Dict[str, Any]]:
    """``download_url_to_file``: into the worker's inbox, which it may read (it copies the file on)."""
    prefix = header.get("hash_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise ValueError("hash_prefix must be a string")
    name = os.path.basename(urlsplit(url).path)
    name = name if name not in ("", ".", "..") and len(name) <= 200 else "download"
    target = os.path.join(inbox, f"{os.urandom(6).hex()}-{name}")
    result = download(client, url, target, hash_prefix=prefix, progress=progress, max_bytes=quota.left())
    quota.take_bytes(result.size, url)
    return result.path, {"url": url, "file": name, "size": result.size, "sha256": result.sha256}
