"""The one place flowhub talks HTTP: sessions, timeouts, retries, the offline switch and the token.

Every request goes through :meth:`HttpClient.get`, which
- refuses to open a socket when offline mode is on,
- uses a (connect, read) timeout of ``FLOWHUB_TIMEOUT`` seconds,
- retries connection errors, 408, 429 and 5xx with jittered backoff, honouring Retry-After,
- sends ``GITHUB_TOKEN`` only to the configured API host, and retries once without it on 401/403,
- fetches http(s) URLs only, and follows redirects itself (at most ``MAX_REDIRECTS``), so that a
  client's ``allow_url`` check sees the first URL and every redirect hop before anything connects.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from flowhub._version import __version__
from flowhub.net import urls
from flowhub.errors import HTTPStatusError, NetworkError, OfflineError, RateLimitError, RequestTimeoutError
from flowhub.settings import ENV_OFFLINE, ENV_TIMEOUT, Settings

USER_AGENT = f"flowhub/{__version__} (oneflow.hub compatible)"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = requests.models.DEFAULT_REDIRECT_LIMIT  # 30, as requests
_local = threading.local()


def _new_session(retries: int) -> requests.Session:
    retry = Retry(
        total=retries, connect=retries, read=retries, status=retries, other=0, redirect=None,
        allowed_methods=frozenset({"GET", "HEAD"}), status_forcelist=RETRY_STATUSES,
        backoff_factor=0.5, backoff_jitter=0.5, backoff_max=8, retry_after_max=30,
        respect_retry_after_header=True, raise_on_status=False,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=4, pool_maxsize=8)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


def session_for(retries: int) -> requests.Session:
    """One session per (process, thread, retry policy): sessions are not fork- or thread-safe."""
    pid = os.getpid()
    sessions: Dict[Tuple[int, int], requests.Session] = getattr(_local, "sessions", {})
    if any(key[0] != pid for key in sessions):  # inherited across a fork: never reuse the parent's sockets
        sessions = {}
    _local.sessions = sessions
    key = (pid, retries)
    if key not in sessions:
        sessions[key] = _new_session(retries)
    return sessions[key]


def _host(url: str) -> str:
    return urlsplit(url).netloc.lower()


def _is_under(url: str, base: str) -> bool:
    """True if ``url`` is on the same host as ``base`` and below its path."""
    u, b = urlsplit(url), urlsplit(base)
    return (u.scheme, u.netloc.lower()) == (b.scheme, b.netloc.lower()) and \
        (u.path + "/").startswith(b.path.rstrip("/") + "/")


def is_rate_limited(response: requests.Response) -> bool:
    if response.status_code == 429:
        return True
    if response.status_code == 403:
        if response.headers.get("X-RateLimit-Remaining") == "0":
            return True
        return "rate limit" in response.text.lower()
    return False


class HttpClient:
    """HTTP GETs under one :class:`~flowhub.settings.Settings`.

    ``allow_url(url)``, if given, is called with the first URL of every request and with each redirect
    target before it is requested; it raises (e.g. ``PermissionError``) to refuse one.
    """

    def __init__(self, settings: Settings, allow_url: Optional[Callable[[str], None]] = None) -> None:
        self.settings = settings
        self.allow_url = allow_url

    @property
    def timeout(self) -> Tuple[float, float]:
        return (self.settings.timeout, self.settings.timeout)

    def check_online(self, what: str) -> None:
        """Raise :class:`OfflineError` before any network access when offline mode is on."""
        if self.settings.offline:
            raise OfflineError(
                f"{what} needs the network, but offline mode is on ({ENV_OFFLINE}=1 or Hub(offline=True)) "
                "and it is not in the cache. Run once with network access to fill the cache, "
                f"or unset {ENV_OFFLINE}.")

    def get(self, url: str, *, what: str, stream: bool = False,
            headers: Optional[Mapping[str, str]] = None, allow_redirects: bool = True) -> requests.Response:
        """GET ``url``; ``what`` names the purpose in error messages. HTTP error statuses are returned, not raised."""
        self.check_url(url, what)
        self.check_online(what)
        request_headers = dict(headers or {})
        token = self.settings.github_token
        send_token = bool(token) and _is_under(url, self.settings.github_api_url)
        if send_token:
            request_headers["Authorization"] = f"token {token}"
        response = self._send(url, what, stream, request_headers, allow_redirects)
        if send_token and response.status_code in (401, 403) and not is_rate_limited(response):
            warnings.warn(
                f"The GitHub API at {_host(url)} refused GITHUB_TOKEN (HTTP {response.status_code}); "
                "retrying without it. Check the token's scopes or unset GITHUB_TOKEN.", stacklevel=3)
            response.close()
            request_headers.pop("Authorization", None)
            response = self._send(url, what, stream, request_headers, allow_redirects)
        if is_rate_limited(response):
            reset = response.headers.get("X-RateLimit-Reset")
            response.close()
            raise RateLimitError(
                f"{what}: the GitHub API at {_host(url)} rate-limited this machine (HTTP {response.status_code}"
                + (f", resets at epoch {reset}" if reset else "") + "). Set GITHUB_TOKEN to a personal access token "
                "for a higher limit, or pass skip_validation=True to skip the API calls that check the ref.")
        return response

    def check_url(self, url: str, what: str) -> None:
        """Raise ``ValueError`` unless ``url`` is http(s), then apply ``allow_url``."""
        try:
            urls.http_origin(url)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
        if self.allow_url is not None:
            self.allow_url(url)

    def _send(self, url: str, what: str, stream: bool, headers: Dict[str, str], allow_redirects: bool) -> requests.Response:
        session = session_for(self.settings.retries)
        try:
            response = session.get(url, stream=stream, headers=headers, timeout=self.timeout, allow_redirects=False)
            hops = 0
            while allow_redirects and response.is_redirect and response.next is not None:
                # ``next`` is the request requests would send (Authorization dropped on a new host, the
                # method rewritten, Range kept): check its URL, as requests will connect with it.
                hop = response.next
                response.close()
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise NetworkError(f"{what}: more than {MAX_REDIRECTS} redirects, starting from {url}.")
                try:
                    urls.http_origin(hop.url)
                    if self.allow_url is not None:
                        self.allow_url(hop.url)
                except (PermissionError, ValueError) as exc:
                    raise type(exc)(f"{what}: {response.url} redirected to {hop.url!r:.200}: {exc}") from None
                env = session.merge_environment_settings(hop.url, {}, stream, None, None)
                response = session.send(hop, timeout=self.timeout, allow_redirects=False, **env)
            return response
        except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
            raise network_error(what, url, exc, self.settings) from exc


def network_error(what: str, url: str, exc: BaseException, settings: Settings) -> NetworkError:
    """Turn a requests/urllib3 failure into flowhub's error with a message that says what to do."""
    text = str(exc)
    timed_out = isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower()
    if timed_out:
        return RequestTimeoutError(
            f"{what}: {_host(url)} did not answer within {settings.timeout:g} s ({ENV_TIMEOUT}), "
            f"{settings.retries} retries included, for {url}. Check the network or the server, "
            f"or raise {ENV_TIMEOUT}.")
    return NetworkError(
        f"{what}: could not reach {url} after {settings.retries} retries ({type(exc).__name__}: {text}). "
        f"Check the network, proxies and FLOWHUB_GITHUB_URL / FLOWHUB_GITHUB_API_URL; "
        f"to use only what is cached, set {ENV_OFFLINE}=1.")


def check_status(response: requests.Response, what: str) -> None:
    """Raise :class:`HTTPStatusError` naming ``what`` for any answer that is not 2xx."""
    if not 200 <= response.status_code < 300:
        response.close()
        raise HTTPStatusError(f"{what}: HTTP {response.status_code} {response.reason} from {response.url}.",
                              response.status_code)
