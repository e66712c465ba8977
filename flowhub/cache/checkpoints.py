"""Weight files in ``<hub>/checkpoints``: download once, verify, extract zipped OneFlow checkpoints once.

OneFlow 0.9 saves a checkpoint as a *folder* (``pickled_data`` plus ``tensor_N/``), so hubs ship it
zipped. The reference re-extracts the zip over ``checkpoints/<first member>`` on every call (racing
with every other process) and trusts that the first member is the folder. Here each zip is
extracted once, into a folder named after the zip file itself (two zips with the same inner folder
never collide), staged and published atomically, and the checkpoint is found by looking for
``pickled_data`` rather than by member order.

A download is checked to be a checkpoint before it is published (:func:`checkpoint_format`): a zip of
a OneFlow checkpoint folder, a PyTorch file (zip or legacy pickle) or a safetensors file. An HTML
error page or a truncated zip is refused with what was received, and nothing is cached. OneFlow's
``flow.load`` hands any single file to ``torch.load``, which unpickles it (runs its code), so
:func:`load_checkpoint` never gives it one outside a sandboxed worker: torch and safetensors files
are read by :mod:`flowhub.formats` instead (:func:`read_weights_file`), in any process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import zipfile
import zlib
from typing import Any, Callable, Dict, Optional, Sequence
from urllib.parse import urlparse

from flowhub import formats
from flowhub.cache import archive, store
from flowhub.net.download import download
from flowhub.errors import ArchiveError, CheckpointFormatError, OfflineError
from flowhub.net.http import HttpClient
from flowhub.settings import ENV_OFFLINE
from flowhub.cache import mapping
from flowhub.notices import notice

HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")
EXTRACTED_SUFFIX = ".extracted"
#: ``<hub>/checkpoints/<this>/``: weights fetched for sandboxed workers, apart from the files trusted
#: loads use (an untrusted hubconf must not plant a checkpoint under a name they would load).
SANDBOXED_DIR = ".sandboxed"
_MARKER = store.META_DIR + "-complete.json"  # inside ``<zip>.extracted/``, written last
# What a zip that cannot be extracted raises (zipfile lets zlib's and some others through).
_BAD_ZIP = (ArchiveError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)
#: The pickled magic number that opens a legacy (non-zip) ``torch.save`` file, after the protocol (and frame).
_TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
_TORCH_ZIP_RECORD = re.compile(r"^[^/]+/data\.pkl$")
_ONEFLOW_MARKERS = ("pickled_data", "snapshot_done")  # flow.save's pickle; the legacy format's last file
_MAX_SAFETENSORS_HEADER = 100 << 20  # what safetensors itself accepts
FORMATS = {
    "oneflow-zip": "a zip of a OneFlow checkpoint folder",
    "torch-zip": "a PyTorch checkpoint (zip format)",
    "torch-legacy": "a PyTorch checkpoint (legacy pickle format)",
    "safetensors": "a safetensors file",
}
_EXPECTED = ("a zip of a OneFlow checkpoint folder (flow.save's folder, with pickled_data), a PyTorch .pth "
             "(a zip with <name>/data.pkl, or a legacy pickle) or a .safetensors file")


def check_file_name(name: Any, what: str = "file_name") -> str:
    """``name`` if it can name a file inside the checkpoints folder, else ``ValueError``."""
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0") \
            or len(name.encode("utf-8", "surrogateescape")) > 255 or name == store.META_DIR \
            or name.endswith(EXTRACTED_SUFFIX):
        raise ValueError(
            f"{what}={name!r:.120} is not a plain file name. It names the file inside the checkpoints folder "
            f"(model_dir), so it may not be empty, '.' or '..', contain '/', '\\' or NUL, be longer than 255 "
            f"bytes, be {store.META_DIR!r} or end with {EXTRACTED_SUFFIX!r}. To keep the file elsewhere, choose "
            "its folder instead (model_dir=..., or --model-dir / -o on the command line).")
    return name


def _zip_format(path: str) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n.replace("\\", "/") for n in zf.namelist()]
    except (OSError, *_BAD_ZIP):
        return None
    if any(not n.endswith("/") and n.rsplit("/", 1)[-1] in _ONEFLOW_MARKERS for n in names):
        return "oneflow-zip"
    if any(_TORCH_ZIP_RECORD.match(n) for n in names):
        return "torch-zip"
    return None


def _is_safetensors(f: Any, size: int) -> bool:
    """An 8-byte header length, a JSON header of tensors, and data that their offsets cover exactly."""
    length = int.from_bytes(f.read(8), "little")
    if not 2 <= length <= min(_MAX_SAFETENSORS_HEADER, size - 8):
        return False
    raw = f.read(length)
    if not raw.startswith(b"{"):
        return False
    try:
        header = json.loads(raw)
    except ValueError:
        return False
    if not isinstance(header, dict):
        return False
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return False
        end = max(end, offsets[1])
    return end == size - 8 - length


def checkpoint_format(path: str) -> Optional[str]:
    """Which known format the file ``path`` is in (a key of :data:`FORMATS`), or None; reads only its
    first bytes, a zip's member list or a safetensors header, never runs anything in it."""
    if zipfile.is_zipfile(path):
        return _zip_format(path)
    with open(path, "rb") as f:
        head = f.read(32)
        if head.startswith(b"\x80") and _TORCH_LEGACY_MAGIC in head:
            return "torch-legacy"
        f.seek(0)
        if _is_safetensors(f, os.fstat(f.fileno()).st_size):
            return "safetensors"
    return None


def _received(path: str, content_type: Optional[str] = None) -> str:
    """What ``path`` holds, for an error message: size, content type, first bytes and a guess."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(48)
    start = head.lstrip().lower()
    if (content_type or "").lower().startswith(("text/html", "application/xhtml")) \
            or start.startswith((b"<!doctype", b"<html", b"<head", b"<body")):
        guess = "an HTML page (an error or login page, or a wrong URL?)"
    elif head.startswith(b"PK"):
        guess = "a zip holding neither a OneFlow checkpoint folder nor a PyTorch checkpoint" \
            if zipfile.is_zipfile(path) else "a truncated or corrupt zip"
    elif size == 0:
        guess = "an empty file"
    else:
        guess = "no checkpoint format flowhub knows"
    return (f"{size} bytes" + (f" of {content_type}" if content_type else "")
            + (f" starting {head!r}" if head else "") + f": {guess}")


def _validator(url: str) -> Callable[[str, Optional[str]], None]:
    """The check a weight download must pass before it is published in the cache."""
    def validate(path: str, content_type: Optional[str]) -> None:
        if checkpoint_format(path) is None:
            raise CheckpointFormatError(
                f"Downloading {url}: it is not a checkpoint. Received {_received(path, content_type)}. "
                f"Expected {_EXPECTED}. Nothing was cached; the next call downloads it again.")
    return validate


def file_record_path(model_dir: str, filename: str) -> str:
    return os.path.join(model_dir, store.META_DIR, "files", filename + ".json")


def cached_file_ok(model_dir: str, filename: str) -> bool:
    """The file exists under its final name and, if we downloaded it, still has the size we recorded."""
    path = os.path.join(model_dir, filename)
    if not os.path.isfile(path):
        return False
    record = store.read_json(file_record_path(model_dir, filename))
    return not (isinstance(record, dict) and record.get("size") not in (None, os.path.getsize(path)))


def _cached_checkpoint_ok(model_dir: str, filename: str) -> bool:
    """:func:`cached_file_ok`, and the file is a checkpoint (one cached before formats were checked, an
    HTML page or a truncated zip, is downloaded again instead of failing on every call)."""
    if not cached_file_ok(model_dir, filename):
        return False
    try:
        return checkpoint_format(os.path.join(model_dir, filename)) is not None
    except OSError:
        return False


def fetch_weights(client: HttpClient, url: str, model_dir: str, *, progress: bool = True,
                  check_hash: bool = False, file_name: Optional[str] = None,
                  refresh: Optional[Callable[[str], bool]] = None, max_bytes: Optional[int] = None) -> str:
    """Return the path of the cached file for ``url``, downloading it once (under a lock) if needed
    (at most ``max_bytes``: see :func:`flowhub.net.download.download`).

    ``refresh(path)`` returning True forces a new download of a cached file (``force_reload``). The
    download must be a checkpoint (:func:`checkpoint_format`), or nothing is cached.
    """
    if file_name is not None:
        filename = check_file_name(file_name)
    else:
        try:
            filename = check_file_name(os.path.basename(urlparse(url).path), "the name from the URL")
        except ValueError:
            raise ValueError(f"Cannot name the file for {url!r:.200} from its path: pass file_name=...") from None
    os.makedirs(model_dir, exist_ok=True)
    cached = os.path.join(model_dir, filename)
    force = bool(refresh and client.settings.job_role != "wait" and os.path.exists(cached) and refresh(cached))
    if not force and _cached_checkpoint_ok(model_dir, filename):
        store.touch(file_record_path(model_dir, filename))
        return cached
    if client.settings.offline:
        raise OfflineError(f"{url} is not cached in {model_dir} and offline mode is on ({ENV_OFFLINE}=1). "
                           f"Download it once with network access, or unset {ENV_OFFLINE}.")
    hash_prefix = None
    if check_hash:
        match = HASH_REGEX.search(filename)
        hash_prefix = match.group(1) if match else None
    lock = os.path.join(store.meta_dir(model_dir, "locks"), store.lock_name(filename))
    waiting = client.settings.job_role == "wait" and not force  # another rank of the job fetches it
    with store.entry_lock(lock, client.settings.lock_timeout, f"downloading {filename}", defer=waiting,
                          done=(lambda: _cached_checkpoint_ok(model_dir, filename)) if not force else None,
                          wait_timeout=client.settings.job_timeout):
        if not force and _cached_checkpoint_ok(model_dir, filename):
            return cached
        notice(f'Downloading: "{url}" to {cached}')
        result = download(client, url, cached, hash_prefix=hash_prefix, progress=progress, validate=_validator(url),
                          max_bytes=max_bytes)
        try:
            store.write_json_atomic(file_record_path(model_dir, filename), {
                "url": url, "size": result.size, "sha256": result.sha256, "etag": result.etag,
                "mtime_ns": os.stat(cached).st_mtime_ns, "downloaded_at": time.time()})
        except OSError:
            pass
    return cached


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(model_dir: str, filename: str, url: str) -> Dict[str, Any]:
    """URL, size and SHA-256 of a cached weight file; re-hashed unless the record's size and mtime still match."""
    path = os.path.join(model_dir, filename)
    st = os.stat(path)
    record = store.read_json(file_record_path(model_dir, filename))
    if isinstance(record, dict) and record.get("sha256") and record.get("size") == st.st_size \
            and record.get("mtime_ns") == st.st_mtime_ns:
        sha = record["sha256"]
    else:
        sha = file_sha256(path)
    return {"url": url, "file": filename, "size": st.st_size, "sha256": sha}


def _checkpoint_in(folder: str) -> str:
    """The path ``oneflow.load`` should get inside an extracted zip."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if "pickled_data" in files or "snapshot_done" in files:
            return root
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    if len(entries) == 1:
        return os.path.join(folder, entries[0])
    return folder


def _intact_record(final: str) -> Optional[Dict[str, Any]]:
    """The completion record of ``final`` if every file it lists is still there with its size, else None."""
    record = store.read_json(os.path.join(final, _MARKER))
    if not isinstance(record, dict):
        return None
    for rel, size in (record.get("files") or {}).items():
        try:
            if os.lstat(os.path.join(final, rel)).st_size != size:
                return None
        except OSError:
            return None
    return record


def _zip_sha256(cached_zip: str, st: os.stat_result) -> str:
    """SHA-256 of the cached zip: from its download record if that still describes the file, else hashed."""
    record = store.read_json(file_record_path(os.path.dirname(cached_zip), os.path.basename(cached_zip)))
    if isinstance(record, dict) and record.get("sha256") and record.get("size") == st.st_size \
            and record.get("mtime_ns") == st.st_mtime_ns:
        return record["sha256"]
    return file_sha256(cached_zip)


def _discard(cached_zip: str, used: os.stat_result) -> None:
    """Remove a cached file that cannot be used (and its record), unless it was replaced meanwhile."""
    try:
        now = os.stat(cached_zip)
        if (now.st_ino, now.st_size, now.st_mtime_ns) == (used.st_ino, used.st_size, used.st_mtime_ns):
            os.remove(cached_zip)
            store.remove_tree(file_record_path(os.path.dirname(cached_zip), os.path.basename(cached_zip)))
    except OSError:
        pass


def extracted_checkpoint(cached_zip: str, lock_timeout: float) -> str:
    """Extract ``cached_zip`` once into ``<zip>.extracted/`` and return the checkpoint path inside it.

    The folder is replaced only when its zip has new content or a file it produced has gone or
    changed size: the same bytes published again (a second download, ``force_reload``) only update its
    record, so processes reading the folder meanwhile are never pulled from under. A zip that cannot be
    extracted (corrupt, or with members that would escape the folder) is removed from the cache, so
    the next call downloads it again instead of failing on the same bytes forever.
    """
    model_dir = os.path.dirname(cached_zip)
    final = cached_zip + EXTRACTED_SUFFIX
    marker = os.path.join(final, _MARKER)
    stat = os.stat(cached_zip)
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def current(record: Optional[Dict[str, Any]]) -> bool:
        return record is not None and all(record.get(k) == v for k, v in stamp.items())

    if current(_intact_record(final)):
        return _checkpoint_in(final)
    lock = os.path.join(store.meta_dir(model_dir, "locks"), store.lock_name(os.path.basename(final)))
    with store.entry_lock(lock, lock_timeout, f"extracting {os.path.basename(cached_zip)}"):
        record = _intact_record(final)
        if current(record):
            return _checkpoint_in(final)
        sha = _zip_sha256(cached_zip, stat)
        if record is not None and record.get("sha256") == sha:
            try:
                store.write_json_atomic(marker, dict(record, **stamp))
            except OSError:
                pass
            return _checkpoint_in(final)
        stage = store.staging_dir(model_dir)
        try:
            try:
                written = archive.extract_zip(cached_zip, stage, f"Extracting {cached_zip}")
            except _BAD_ZIP as exc:
                _discard(cached_zip, stat)
                message = str(exc) if isinstance(exc, ArchiveError) else \
                    f"Extracting {cached_zip}: it is corrupt ({type(exc).__name__}: {exc})."
                raise ArchiveError(f"{message} The cached copy was removed, so the next call downloads it "
                                   "again.") from None
            files = {rel: os.lstat(os.path.join(stage, rel)).st_size for rel in written}
            store.write_json_atomic(os.path.join(stage, _MARKER), dict(stamp, sha256=sha, files=files))
            # Someone without the lock may have published the same content meanwhile: keep theirs.
            existing = _intact_record(final)
            same = existing is not None and existing.get("sha256") == sha
            store.publish_dir(stage, final, model_dir, replace=os.path.lexists(final) and not same)
        finally:
            store.remove_tree(stage)
    return _checkpoint_in(final)


def remap(obj: Any, map_location: Any) -> Any:
    """Apply a dict or callable ``map_location`` (which oneflow.load itself does not accept)."""
    import oneflow as flow

    if isinstance(obj, flow.Tensor):
        if callable(map_location):
            return map_location(obj, obj.device.type)
        target = map_location.get(obj.device.type, map_location.get(str(obj.device)))
        return obj.to(target) if target is not None else obj
    if isinstance(obj, dict):
        return type(obj)((k, remap(v, map_location)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(remap(v, map_location) for v in obj)
    return obj


def weights_file_kind(path: Any) -> Optional[str]:
    """The format of ``path`` if it is a single weights file that :mod:`flowhub.formats` reads safely in any
    process (torch zip or legacy, safetensors), else None."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    try:
        kind = checkpoint_format(os.fspath(path))
    except OSError:
        return None
    return kind if kind in formats.KINDS else None


def read_weights_file(path: str, kind: str, map_location: Any = None, *, mapped: bool) -> Any:
    """The object in a torch or safetensors file, with oneflow tensors (see :func:`flowhub.formats.read`).

    With ``mapped`` (only for files never rewritten in place: this cache's) tensors map the file
    copy-on-write, and those that do are remembered like mapped checkpoint folders
    (:func:`flowhub.cache.mapping.take_loaded`), so a worker can send them back as references.
    """
    loaded = formats.read(path, kind, mapped=mapped)
    if loaded.extents:
        mapping.remember(path, loaded.extents)
    return _placed(loaded.value, map_location)


def _placed(value: Any, map_location: Any) -> Any:
    """``value`` (tensors on the CPU) moved as ``map_location`` says (a device, a dict or a callable)."""
    if map_location is None:
        return value
    import oneflow as flow  # delayed: only a load needs oneflow

    if isinstance(map_location, (str, flow.device)):
        device = flow.device(map_location)
        return value if device.type == "cpu" else remap(value, lambda tensor, _: tensor.to(device))
    return remap(value, map_location)


def install_weights_files_loader(roots: Sequence[str]) -> None:
    """In a worker: ``oneflow.load`` (so ``torch.load`` under ``mock_torch``) reads torch and safetensors
    files with :func:`read_weights_file`, mapped when they lie under ``roots`` (the hub cache), instead
    of handing them to ``torch.load``; everything else goes to oneflow's own ``load``."""
    import oneflow as flow  # delayed: only a worker's load needs oneflow

    original = getattr(flow.load, "flowhub_original", flow.load)
    roots = tuple(roots)

    def load(path: Any, global_src_rank: Optional[int] = None, map_location: Any = None, **torch_options: Any) -> Any:
        kind = weights_file_kind(path) if global_src_rank is None else None
        if kind is None:
            return original(path, global_src_rank, map_location)
        # torch.load's weights_only / mmap need nothing more: the reader is allow-list only and maps
        return read_weights_file(os.fspath(path), kind, map_location, mapped=store.inside(os.fspath(path), roots))

    load.flowhub_original = original  # type: ignore[attr-defined]
    flow.load = load


def _in_sandbox() -> bool:
    from flowhub import sandbox

    return sandbox.active()


def load_checkpoint(path: str, map_location: Any = None, lock_timeout: float = 600.0) -> Any:
    """``oneflow.load`` a checkpoint folder, or a zip of one (extracted once first); read a torch
    (``.pth``/``.pt``, zip or legacy) or safetensors file with :func:`read_weights_file`.

    This is ``load_state_dict_from_url`` / ``load_weights`` without ``weights_only``: the folder's
    ``pickled_data`` is unpickled here, as the reference does, so use it for checkpoints you trust.
    Torch files are read by an allow-list unpickler that runs nothing (safe anywhere), mapped
    zero-copy when this cache downloaded them. Any other *single file* is never handed to
    ``oneflow.load`` outside a sandboxed worker: OneFlow passes it to ``torch.load``, which unpickles
    it (runs any code it holds); it raises :class:`~flowhub.errors.CheckpointFormatError` instead.
    """
    import oneflow as flow

    if not os.path.isdir(path):
        kind = checkpoint_format(path)
        if kind == "oneflow-zip":
            path = extracted_checkpoint(path, lock_timeout)
        elif kind in formats.KINDS:  # read by flowhub's allow-list readers, never unpickled
            published = os.path.exists(file_record_path(os.path.dirname(path), os.path.basename(path)))
            return read_weights_file(path, kind, map_location, mapped=published)
        elif not _in_sandbox():
            what = f"is {FORMATS[kind]}" if kind else f"is not a checkpoint ({_received(path)})"
            raise CheckpointFormatError(
                f"{path} {what}. OneFlow would hand this single file to torch.load, which unpickles it (running "
                "any code it holds) in this process and needs torch; flowhub does not do that outside a sandbox. "
                "Load it with weights_only=True (in a sandboxed worker), or save it as a OneFlow checkpoint "
                "(oneflow.save) and zip that folder.")
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(path)))]  # the checkpoints folder holding it
    # a published entry is mapped, not copied; anything else is loaded by oneflow as it is
    with mapping.mapped_loads(roots) if _published(path) else contextlib.nullcontext():
        if map_location is None or isinstance(map_location, (str, flow.device, flow.placement)):
            return flow.load(path, map_location=map_location)
        return remap(flow.load(path, map_location="cpu"), map_location)


def _published(path: str) -> bool:
    """True for a checkpoint folder this cache extracted (``<zip>.extracted/...``): published by rename,
    never rewritten in place, so its files may be mapped."""
    return EXTRACTED_SUFFIX + os.sep in os.path.realpath(path) + os.sep
