"""The reference's ``trust_repo`` rules, with its bugs fixed.

- Built-in trusted owners are matched exactly and case-insensitively (oneflow 0.9.0 did a substring
  test on the string ``"oneflow"``, trusting ``"o"`` and not ``Oneflow-Inc``).
- ``trusted_list`` entries and legacy cache folders are matched case-insensitively, like GitHub.
- No ``input()`` prompt without a terminal: an error says how to trust the repository instead.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Optional, Union

from flowhub.cache import store
from flowhub.errors import UntrustedRepositoryError
from flowhub.spec import RepoSpec

TRUSTED_OWNERS = ("oneflow-inc", "oneflow")
TRUSTED_LIST = "trusted_list"
TrustArg = Union[bool, str, None]


def trusted_list_path(hub_dir: str) -> str:
    return os.path.join(hub_dir, TRUSTED_LIST)


def read_trusted(hub_dir: str) -> set:
    """Lower-cased ``owner_repo`` names in ``trusted_list`` (created empty if missing, as the reference does)."""
    path = trusted_list_path(hub_dir)
    os.makedirs(hub_dir, exist_ok=True)
    if not os.path.exists(path):
        open(path, "a").close()
    with open(path, encoding="utf-8") as f:
        return {line.strip().lower() for line in f if line.strip()}


def add_trusted(hub_dir: str, spec: RepoSpec, lock_timeout: float = 60.0) -> None:
    """Append ``owner_repo`` to ``trusted_list`` once, under a lock."""
    lock = os.path.join(store.meta_dir(hub_dir, "locks"), "trusted_list.lock")
    with store.entry_lock(lock, lock_timeout, "updating trusted_list"):
        if spec.trust_name.lower() not in read_trusted(hub_dir):
            with open(trusted_list_path(hub_dir), "a", encoding="utf-8") as f:
                f.write(spec.trust_name + "\n")


def remove_trusted(hub_dir: str, spec: RepoSpec, lock_timeout: float = 60.0) -> None:
    """Remove ``owner_repo`` (any spelling) from ``trusted_list``."""
    lock = os.path.join(store.meta_dir(hub_dir, "locks"), "trusted_list.lock")
    with store.entry_lock(lock, lock_timeout, "updating trusted_list"):
        path = trusted_list_path(hub_dir)
        read_trusted(hub_dir)
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and line.strip().lower() != spec.trust_name.lower()]
        tmp = f"{path}.{os.getpid()}.tmp"  # unique: correctness must not depend on the lock
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _sandbox_only_marker(hub_dir: str, spec: RepoSpec) -> str:
    return os.path.join(hub_dir, store.META_DIR, "sandbox-only", spec.trust_name.lower())


def is_trusted(hub_dir: str, spec: RepoSpec, ref: str) -> bool:
    """Trusted by owner, by ``trusted_list``, or because a folder for it was downloaded before (legacy
    rule), unless that download was for sandboxed use without trust (see :func:`check_trust`)."""
    listed = read_trusted(hub_dir)
    if spec.owner.lower() in TRUSTED_OWNERS or spec.trust_name.lower() in listed:
        return True
    if os.path.exists(_sandbox_only_marker(hub_dir, spec)):
        return False
    return store.find_case_insensitive(hub_dir, spec.dir_name(ref)) is not None


def _prompt(question: str, spec: RepoSpec) -> str:
    if not (sys.stdin and sys.stdin.isatty()):
        raise UntrustedRepositoryError(
            f"Untrusted repository: {spec.owner}/{spec.repo} is not in the trusted list and there is no terminal "
            "to ask on. Pass trust_repo=True (to trust it and remember that), or add the line "
            f"'{spec.trust_name}' to the trusted_list file in the hub folder.")
    return input(question)


def check_trust(hub_dir: str, spec: RepoSpec, ref: str, trust_repo: TrustArg, calling_fn: str,
                prompt: Optional[Callable[[str, RepoSpec], str]] = None, untrusted_ok: bool = False) -> None:
    """Apply ``trust_repo`` (None, False, True or ``"check"``) before anything is downloaded or run.

    ``untrusted_ok``: the repository's code will run sandboxed and nothing it returns will run here,
    so an untrusted repository needs no confirmation: ``None`` gives no warning and ``"check"`` no
    prompt (``True`` still records trust, ``False`` still asks, as the caller asked for that).
    """
    ask = prompt or _prompt
    trusted = is_trusted(hub_dir, spec, ref)
    if untrusted_ok and (trust_repo is None or trust_repo == "check"):
        if not trusted:  # its folder will exist without trust: the legacy rule must not trust it later
            os.makedirs(os.path.dirname(_sandbox_only_marker(hub_dir, spec)), exist_ok=True)
            open(_sandbox_only_marker(hub_dir, spec), "a").close()
        return
    if trust_repo is None:
        if not trusted:
            warnings.warn(
                "You are about to download and run code from an untrusted repository. In a future release, "
                "this won't be allowed. To add the repository to your trusted list, change the command to "
                f"{calling_fn}(..., trust_repo=False) and a command prompt will appear asking for an explicit "
                f"confirmation of trust, or {calling_fn}(..., trust_repo=True), which will assume that the "
                "prompt is to be answered with 'yes'. You can also use "
                f"{calling_fn}(..., trust_repo='check') which will only prompt for confirmation if the repo is "
                "not already trusted. This will eventually be the default behaviour", UserWarning, stacklevel=4)
        return
    if trust_repo is True:
        if not trusted or spec.trust_name.lower() not in read_trusted(hub_dir):
            add_trusted(hub_dir, spec)
        return
    if trust_repo == "check" and trusted:
        return
    if trust_repo is not False and trust_repo != "check":
        raise ValueError(f"trust_repo must be None, False, True or 'check', not {trust_repo!r}.")
    answer = ask(
        "The repository {0} does not belong to the list of trusted repositories and as such cannot be "
        "downloaded. Do you trust this repository and wish to add it to the trusted list of repositories "
        "(y/N)?".format(spec.trust_name), spec).strip().lower()
    if answer in ("y", "yes"):
        if trusted:
            print("The repository is already trusted.")
        else:
            add_trusted(hub_dir, spec)
        return
    if answer in ("n", "no", ""):
        raise UntrustedRepositoryError("Untrusted repository.")
    raise ValueError(f"Unrecognized response {answer}.")
