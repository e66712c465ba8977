"""The story of one download: stream to a unique temp file, hash on the fly, resume, verify, publish.

Bytes go to ``<dst>.<random>.partial`` in the destination folder (so the final rename is atomic and
the file gets the umask's permissions), in 1 MiB chunks, with SHA-256 computed as they arrive. A
dropped connection is resumed with a ``Range`` request that is validated (206, matching
``Content-Range``, same ``ETag``); a 200 answer to it restarts cleanly. The size is checked against
``Content-Length``, the hash against what the caller expects, and the content by the caller's
``validate`` hook (e.g. "is this a checkpoint?") before ``os.replace`` publishes the file. On any
failure the temp file is removed, so nothing half-written or unwanted is ever mistaken for a file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
import uuid
from typing import Any, BinaryIO, Callable, Optional

import requests
import urllib3
from tqdm.auto import tqdm

from flowhub import settings as settings_mod
from flowhub.errors import DownloadTooLargeError, HashMismatchError, IncompleteDownloadError, NetworkError
from flowhub.net.http import HttpClient, check_status, network_error
from flowhub.net.urls import http_origin

CHUNK_SIZE = 1 << 20
MAX_RESUMES = 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_STREAM_ERRORS = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                  requests.exceptions.Timeout, urllib3.exceptions.HTTPError, ConnectionError)


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    """What was published: where, how many bytes, their SHA-256, and the server's ETag."""

    path: str
    size: int
    sha256: str
    etag: Optional[str]


#: ``validate(temp_path, content_type)``: raise to refuse a finished download (nothing is published).
Validator = Callable[[str, Optional[str]], None]


def temp_path_for(dst: str) -> str:
    """A unique temp name beside ``dst`` (same filesystem, so publishing is one atomic rename)."""
    return f"{dst}.{uuid.uuid4().hex[:12]}.partial"


class _NoBar:
    """The progress bar of a download without one."""

    def update(self, n: int = 1) -> None:
        pass

    def reset(self, total: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass


_NO_BAR: Any = _NoBar()


class _Transfer:
    """State of one download across its resumed requests."""

    def __init__(self, client: HttpClient, url: str, out: BinaryIO, progress: bool, desc: str,
                 max_bytes: Optional[int] = None) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.url = url
        self.out = out
        self.sha = hashlib.sha256()
        self.written = 0
        self.total: Optional[int] = None
        self.etag: Optional[str] = None
        self.content_type: Optional[str] = None
        self.progress = progress
        self.desc = desc
        self.bar: Any = None  # a tqdm (or _NO_BAR), created once the size is known

    def show_total(self) -> None:
        if self.bar is None and not self.progress:
            self.bar = _NO_BAR  # a tqdm, even a disabled one, starts tqdm's monitor thread
        elif self.bar is None:
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, unit_divisor=1024,
                            disable=not self.progress, desc=self.desc, file=sys.stderr, leave=True)
        else:
            self.bar.reset(total=self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.sha = hashlib.sha256()
        self.written = 0

    def open(self) -> requests.Response:
        headers = {"Accept-Encoding": "identity"}
        if self.written:
            headers["Range"] = f"bytes={self.written}-"
            if self.etag:
                headers["If-Range"] = self.etag
        response = self.client.get(self.url, what=f"Downloading {self.url}", stream=True, headers=headers)
        check_status(response, f"Downloading {self.url}")
        if self.written and response.status_code == 206:
            if self._range_matches(response):
                return response
            # A part of some other version of the file (or of another range): its bytes cannot be
            # appended, nor taken as the start of the file. Start over with a plain request.
            response.close()
            self.restart()
            self.etag = None
            return self.open()
        if self.written:  # the server ignored our Range (200, full body): start over from byte 0
            self.restart()
        length = response.headers.get("Content-Length")
        self.total = int(length) if length is not None and response.status_code == 200 else None
        if self.total is not None:
            self._check_size(self.total)
        self.etag = response.headers.get("ETag")
        self.content_type = response.headers.get("Content-Type")
        self.show_total()
        return response

    def _range_matches(self, response: requests.Response) -> bool:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != self.written:
            return False
        if self.total is not None and match.group(3) != "*" and int(match.group(3)) != self.total:
            return False
        etag = response.headers.get("ETag")
        return not (self.etag and etag and etag != self.etag)

    def pump(self, response: requests.Response) -> None:
        """Write the body as it arrives, each piece into the file's own buffer (``CHUNK_SIZE``, allocated
        once: growing and freeing a block per chunk costs fresh pages every time).

        ``read1`` returns what has arrived (at most one socket read) instead of waiting for a full
        chunk, so when the connection drops, every byte received is already counted and written, and
        the resume starts after them. (``iter_content(CHUNK_SIZE)`` loses up to a chunk on every drop:
        a file smaller than a chunk was never resumed, and a link that drops more often than once per
        chunk never finished.)
        """
        with response:
            raw = response.raw
            while True:
                piece = raw.read1(CHUNK_SIZE, decode_content=True)
                if not piece:
                    break
                self._take(piece)

    def _check_size(self, size: int) -> None:
        if self.max_bytes is not None and size > self.max_bytes:
            raise DownloadTooLargeError(f"Downloading {self.url}: it is over the {self.max_bytes} bytes this "
                                        "download may take; nothing was saved.")

    def _take(self, data: bytes) -> None:
        if data:
            self._check_size(self.written + len(data))
            self.out.write(data)
            self.sha.update(data)
            self.written += len(data)
            self.bar.update(len(data))  # type: ignore[union-attr]


def download(client: HttpClient, url: str, dst: str, *, hash_prefix: Optional[str] = None,
             progress: bool = True, desc: Optional[str] = None,
             validate: Optional[Validator] = None, max_bytes: Optional[int] = None) -> DownloadResult:
    """Download ``url`` to ``dst`` atomically; resume on dropped connections; verify size, hash and,
    with ``validate``, the content (it gets the temp file and the server's ``Content-Type``).
    ``max_bytes``: refuse (``DownloadTooLargeError``, nothing saved) a body that announces or streams more.

    ``TQDM_DISABLE=1`` in the environment turns the progress bar off whatever ``progress`` says
    (``flowhub -q`` sets it, so a hubconf's own ``progress=True`` downloads are quiet too).
    """
    http_origin(url)  # ValueError, before any file is created, for anything but http(s)
    client.check_online(f"Downloading {url}")
    progress = progress and not settings_mod.progress_disabled()
    dst = os.path.abspath(os.path.expanduser(dst))
    tmp = temp_path_for(dst)
    try:
        with open(tmp, "wb", buffering=CHUNK_SIZE) as out:
            transfer = _Transfer(client, url, out, progress, desc or os.path.basename(dst), max_bytes)
            try:
                _run(transfer)
            finally:
                transfer.close()
        digest = transfer.sha.hexdigest()
        if hash_prefix is not None and not digest.startswith(hash_prefix):
            raise HashMismatchError(
                f'invalid hash value (expected "{hash_prefix}", got "{digest}") for {url}; '
                "the file was not saved. The server's copy may be corrupt or the expected hash outdated.")
        if validate is not None:
            validate(tmp, transfer.content_type)
        os.replace(tmp, dst)
        return DownloadResult(dst, transfer.written, digest, transfer.etag)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _run(transfer: _Transfer) -> None:
    """Pump the body, resuming after dropped connections, until it is complete or we give up."""
    failures_without_progress = 0
    attempts = 0
    while True:
        attempts += 1
        before = transfer.written
        try:
            transfer.pump(transfer.open())
        except _STREAM_ERRORS as exc:
            failures_without_progress = 0 if transfer.written > before else failures_without_progress + 1
            if failures_without_progress > transfer.client.settings.retries or attempts > MAX_RESUMES:
                raise _stream_failure(transfer, exc, attempts) from exc
            continue
        except NetworkError:
            raise
        if transfer.total is None or transfer.written == transfer.total:
            return
        # The body ended early without a transport error: treat it like a dropped connection.
        failures_without_progress = 0 if transfer.written > before else failures_without_progress + 1
        if failures_without_progress > transfer.client.settings.retries or attempts > MAX_RESUMES:
            raise IncompleteDownloadError(
                f"Downloading {transfer.url}: the server announced {transfer.total} bytes but sent "
                f"{transfer.written}; nothing was saved. Try again later.")


def _stream_failure(transfer: _Transfer, exc: BaseException, attempts: int) -> Exception:
    if transfer.total is not None and transfer.written < transfer.total and not isinstance(exc, requests.exceptions.Timeout) \
            and "timed out" not in str(exc).lower():
        return IncompleteDownloadError(
            f"Downloading {transfer.url}: the connection kept dropping ({transfer.written} of {transfer.total} "
            f"bytes after {attempts} requests, {transfer.client.settings.retries} retries allowed without progress, "
            f"{MAX_RESUMES} resumes in all); nothing was saved. Try again later.")
    return network_error(f"Downloading {transfer.url}", transfer.url, exc, transfer.client.settings)
