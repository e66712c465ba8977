"""Every setting flowhub reads, with its environment variable and default, in one place.

Settings are read when a call is made, never frozen at import time: a user (or a test) may set
``FLOWHUB_OFFLINE=1`` after ``import flowhub`` and the next call honours it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

ENV_ONEFLOW_HOME = "ONEFLOW_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"
DEFAULT_CACHE_DIR = "~/.cache"
ENV_GITHUB_TOKEN = "GITHUB_TOKEN"

ENV_GITHUB_URL = "FLOWHUB_GITHUB_URL"
ENV_GITHUB_API_URL = "FLOWHUB_GITHUB_API_URL"
ENV_OFFLINE = "FLOWHUB_OFFLINE"
ENV_TIMEOUT = "FLOWHUB_TIMEOUT"
ENV_RETRIES = "FLOWHUB_RETRIES"
ENV_LOCK_TIMEOUT = "FLOWHUB_LOCK_TIMEOUT"
ENV_MODE = "FLOWHUB_MODE"
ENV_WORKER_TIMEOUT = "FLOWHUB_WORKER_TIMEOUT"
ENV_SANDBOX = "FLOWHUB_SANDBOX"

DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_GITHUB_API_URL = "https://api.github.com"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
DEFAULT_LOCK_TIMEOUT = 600.0
DEFAULT_MODE = "rebuild"
SANDBOX_DEFAULT_MODE = "proxy"
MODES = ("inprocess", "rebuild", "proxy")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off.")


def _env_float(env: Mapping[str, str], name: str, default: Optional[float]) -> Optional[float]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds.") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds.")
    return value


def _seconds(value: Any, name: str, env_name: str) -> float:
    """``value`` (from ``Hub(name=...)`` or ``env_name``) as a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name}={value!r} is not a positive number of seconds; set Hub({name}=...) or "
                         f"{env_name} to one, e.g. 10.")
    return seconds


def _optional_seconds(value: Any, name: str, env_name: str) -> Optional[float]:
    return None if value is None else _seconds(value, name, env_name)


def _retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"retries={value!r} is not a whole number >= 0; set Hub(retries=...) or {ENV_RETRIES} "
                         "to one, e.g. 2.")
    return int(value)


def _hub_dir(value: Any) -> str:
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise ValueError(f"hub_dir={value!r} is not a folder: pass a path (Hub(hub_dir=...) or set_dir), or None "
                         f"for the default (${ENV_ONEFLOW_HOME}/hub, ${ENV_XDG_CACHE_HOME}/oneflow/hub or "
                         "~/.cache/oneflow/hub).")
    return os.path.expanduser(path)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings of one call: explicit ``Hub`` arguments over environment variables."""

    hub_dir: str
    github_url: str = DEFAULT_GITHUB_URL
    github_api_url: str = DEFAULT_GITHUB_API_URL
    offline: bool = False
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    mode: str = DEFAULT_MODE
    worker_timeout: Optional[float] = None
    sandbox: bool = False
    github_token: Optional[str] = dataclasses.field(default=None, repr=False)

    def as_dict(self) -> dict:
        """The settings a worker gets: everything but the token (a worker reads its own environment)."""
        data = dataclasses.asdict(self)
        del data["github_token"]
        return data


_process_hub_dir: Optional[str] = None


def set_process_hub_dir(path: Optional[str]) -> None:
    """``flowhub.set_dir``: the hub folder of every ``Hub`` in this process that was not given one."""
    global _process_hub_dir
    _process_hub_dir = _hub_dir(path) if path is not None else None


def default_hub_dir(env: Mapping[str, str]) -> str:
    """The reference's precedence: ``set_dir``, $ONEFLOW_HOME/hub, $XDG_CACHE_HOME/oneflow/hub, ~/.cache/oneflow/hub."""
    if _process_hub_dir is not None:
        return _process_hub_dir
    if env.get(ENV_ONEFLOW_HOME):
        return os.path.join(os.path.expanduser(env[ENV_ONEFLOW_HOME]), "hub")
    cache_home = os.path.expanduser(env.get(ENV_XDG_CACHE_HOME) or DEFAULT_CACHE_DIR)
    return os.path.join(cache_home, "oneflow", "hub")


def resolve(overrides: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> Settings:
    """Combine explicit overrides (``None`` = unset) with the environment, read now."""
    env = os.environ if env is None else env

    def pick(key: str, from_env: Any) -> Any:
        value = overrides.get(key)
        return from_env if value is None else value

    sandbox = bool(pick("sandbox", _env_bool(env, ENV_SANDBOX, False)))
    # With a sandbox nothing the worker sends may be unpickled here unless asked for: proxy by default.
    default_mode = SANDBOX_DEFAULT_MODE if sandbox else DEFAULT_MODE
    mode = pick("mode", (env.get(ENV_MODE) or default_mode).strip().lower())
    if mode not in MODES:
        raise ValueError(f"Unknown flowhub mode {mode!r}; choose one of {', '.join(MODES)} "
                         f"(Hub(mode=...) or {ENV_MODE}).")
    retries_raw = env.get(ENV_RETRIES)
    try:
        retries_env = DEFAULT_RETRIES if not retries_raw else int(retries_raw)
    except ValueError:
        raise ValueError(f"{ENV_RETRIES}={retries_raw!r} is not an integer.") from None
    hub_dir = overrides.get("hub_dir")
    return Settings(
        hub_dir=_hub_dir(hub_dir) if hub_dir is not None else default_hub_dir(env),
        github_url=str(pick("github_url", env.get(ENV_GITHUB_URL) or DEFAULT_GITHUB_URL)).rstrip("/"),
        github_api_url=str(pick("github_api_url", env.get(ENV_GITHUB_API_URL) or DEFAULT_GITHUB_API_URL)).rstrip("/"),
        offline=bool(pick("offline", _env_bool(env, ENV_OFFLINE, False))),
        timeout=_seconds(pick("timeout", _env_float(env, ENV_TIMEOUT, DEFAULT_TIMEOUT)), "timeout", ENV_TIMEOUT),
        retries=_retries(pick("retries", retries_env)),
        lock_timeout=_seconds(pick("lock_timeout", _env_float(env, ENV_LOCK_TIMEOUT, DEFAULT_LOCK_TIMEOUT)),
                              "lock_timeout", ENV_LOCK_TIMEOUT),
        mode=mode,
        worker_timeout=_optional_seconds(pick("worker_timeout", _env_float(env, ENV_WORKER_TIMEOUT, None)),
                                         "worker_timeout", ENV_WORKER_TIMEOUT),
        sandbox=sandbox,
        github_token=env.get(ENV_GITHUB_TOKEN) or None,
    )
