"""Parsing ``owner/repo[:ref]`` strings and naming their cache entries."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

from flowhub.errors import RepoSpecError

# GitHub's own rules: owners are alphanumerics and single hyphens; repos also allow '.' and '_'.
_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})$")
_REPO = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
# A git ref: no spaces, control characters, '..', '~^:?*[\\' or a leading '-' / '/'.
_REF = re.compile(r"^(?!-)(?!/)(?!.*\.\.)(?!.*//)[^\s~^:?*\[\\\x00-\x1f\x7f]{1,255}(?<!/)(?<!\.lock)$")


@dataclasses.dataclass(frozen=True)
class RepoSpec:
    """A GitHub repository and an optional ref, as the user wrote it."""

    owner: str
    repo: str
    ref: Optional[str] = None

    @property
    def key(self) -> str:
        """Spelling-independent identity: GitHub treats owner and repo names case-insensitively."""
        return f"{self.owner.lower()}/{self.repo.lower()}"

    @property
    def trust_name(self) -> str:
        """The name the reference writes into ``trusted_list``."""
        return f"{self.owner}_{self.repo}"

    def dir_name(self, ref: str) -> str:
        """The reference's cache folder name, ``<owner>_<repo>_<ref with / replaced by _>``."""
        return f"{self.owner}_{self.repo}_{ref.replace('/', '_')}"

    def with_ref(self, ref: str) -> "RepoSpec":
        return dataclasses.replace(self, ref=ref)

    def __str__(self) -> str:
        return f"{self.owner}/{self.repo}" + (f":{self.ref}" if self.ref else "")


def parse_repo_spec(github: object) -> RepoSpec:
    """Parse ``"owner/repo[:ref]"``; raise :class:`RepoSpecError` with the expected form otherwise."""
    if not isinstance(github, str):
        raise RepoSpecError(f"Expected a string 'repo_owner/repo_name[:ref]', got {type(github).__name__}.")
    text = github.strip()
    if ":" in text:
        repo_info, ref = text.split(":", 1)
        if not ref:
            raise RepoSpecError(f"Invalid repository {github!r}: nothing after ':'. Use 'owner/repo' or 'owner/repo:ref'.")
    else:
        repo_info, ref = text, None
    parts = repo_info.split("/")
    if len(parts) != 2 or not all(parts):
        raise RepoSpecError(
            f"Invalid repository {github!r}: expected 'repo_owner/repo_name[:ref]', e.g. 'Oneflow-Inc/vision:main'. "
            "For a folder on disk, pass source='local'.")
    owner, repo = parts
    if not _OWNER.match(owner):
        raise RepoSpecError(f"Invalid repository owner {owner!r} in {github!r}: GitHub owners use letters, digits and '-'.")
    if not _REPO.match(repo) or repo in (".", ".."):
        raise RepoSpecError(f"Invalid repository name {repo!r} in {github!r}: use letters, digits, '.', '_' and '-'.")
    if ref is not None and not _REF.match(ref):
        raise RepoSpecError(f"Invalid ref {ref!r} in {github!r}: not a valid git branch, tag or commit name.")
    return RepoSpec(owner, repo, ref)
