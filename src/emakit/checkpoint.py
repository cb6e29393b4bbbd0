"""Distributed checkpoints of an EMA: sharded, reloadable on any number of ranks, checksummed,
crash-safe, and safe to load from a folder nobody vouches for.

:func:`save` writes ``ema.state_dict()`` (anything with ``state_dict``/``load_state_dict``) with
``torch.distributed.checkpoint`` (DCP): under FSDP2 every rank writes its own shards, and
:func:`load` reshards them to the ranks of the run that loads.

**Layout.** A checkpoint folder holds a pointer file, :data:`POINTER`, and the DCP files of
the checkpoint it names in a sibling data folder ``dcp-<writer>-<random>/``::

    ckpt/ema/emakit-checkpoint.json     the pointer: data folder, checksums (sealed JSON)
    ckpt/ema/dcp-1a2b3c4d-4242-9f8e7d6c/.metadata, __0_0.distcp, __1_0.distcp, ...

**Crash safety.** A save writes a fresh data folder beside the current one, fsyncs it, then
switches the pointer in one atomic step (``os.replace``; ``os.link`` without ``overwrite``,
which fails if a pointer exists). Until that step the old pointer names the old, untouched
data; after it the new pointer names complete, synced data. So a SIGKILL at any moment leaves
the old checkpoint or the new one loadable. The old data folder is removed after the switch;
data folders and pointer temporaries left by a killed writer (its process gone, on this
machine) are removed by the next save into the folder. Rank 0 decides everything (whether a
checkpoint exists, the data folder's name, the switch) and broadcasts the outcome, so all
ranks raise the same error or none does. Two saves into one new folder: the first to switch
the pointer wins, the other removes its data and raises FileExistsError.

**Checksums.** The pointer records the SHA-256 of ``.metadata`` and, for every data file, its
size and the CRC-32 of each byte range DCP wrote (one per tensor shard or value; the ranges
tile the file, gaps between them, if any, are ranges too), so every byte is covered. The
pointer itself is sealed (see :func:`emakit.io.write_sealed_json`). :func:`load` verifies
the pointer, the metadata and every data file (each rank a share of the files) before it reads
anything, and names the file and the tensor that changed.

**No pickle.** DCP itself unpickles twice on load: ``.metadata`` with ``pickle.load``, and
every non-tensor value (counters, the configuration) with ``torch.load(weights_only=False)``.
Either runs whatever code a crafted file names, and checksums do not stop a crafted folder
(its author can recompute them). :func:`load` therefore reads through

- a restricted unpickler for ``.metadata`` that admits only DCP's metadata classes,
  ``torch.Size``, dtypes, layouts and paths, then checks the result (every storage entry a
  plain file name in the folder, with whole-number offsets), and
- ``torch.load(weights_only=True)`` for non-tensor values; tensors DCP already reads that way.

A file that names anything else is a ValueError naming the file; nothing in it runs.

Folders written by emakit 0.1 (DCP files directly in the folder, no pointer) still load,
without checksums; saving over one (``overwrite=True``) replaces it with the layout above.

Collectives: object broadcasts and gathers over the default process group; they will move to
the engine's collectives module with the restructure.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ._args import flag, path_arg
from .io import (
    abandoned,
    fsync_dir,
    owner_tag,
    read_sealed_json,
    reclaim_temporaries,
    write_sealed_json,
)
from .statefile import read_state, write_state

__all__ = ["save", "load", "read_metadata", "read_checkpoint", "CheckpointInfo",
           "write_state", "read_state", "POINTER", "FORMAT", "FORMAT_VERSION"]

POINTER = "emakit-checkpoint.json"
FORMAT = "emakit.dcp-checkpoint"
FORMAT_VERSION = 1
_METADATA = ".metadata"
_DATA = re.compile(r"dcp-(?P<tag>[0-9a-f]{8}-[0-9]+)-[0-9a-f]{8}")
_LEGACY = re.compile(r"\.metadata(\.tmp)?|__[0-9]+_[0-9]+\.distcp")
_CHUNK = 1 << 24  # bytes read at a time while checksumming

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},  # looks a layout up by name, nothing else
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds DCP metadata and nothing else."""

    def __init__(self, file: io.BufferedIOBase, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise ValueError(
            f"checkpoint_id: {self.path} names {module}.{name}, which is no part of a "
            "checkpoint's metadata; refusing to load it (it could run code)"
        )


def _plain_name(value: Any) -> bool:
    return (isinstance(value, str) and value != "" and not value.startswith(".")
            and os.path.basename(value) == value and "\\" not in value and "\0" not in value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_storage(md: Any, where: str) -> None:
    """Every storage entry a plain file name in the folder, with whole offsets, no transforms."""
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise ValueError(f"checkpoint_id: {where}: storage table is malformed")
    for key, info in storage.items():
        fqn = getattr(key, "fqn", key)
        rel = getattr(info, "relative_path", None)
        if not _plain_name(rel):
            raise ValueError(f"checkpoint_id: {where}: entry {fqn!r} points at {rel!r}, outside "
                             "the checkpoint folder")
        if not (_whole(getattr(info, "offset", None)) and _whole(getattr(info, "length", None))):
            raise ValueError(f"checkpoint_id: {where}: entry {fqn!r} has a malformed offset or "
                             "length")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"checkpoint_id: {where}: entry {fqn!r} needs storage transforms "
                             f"{info.transform_descriptors!r}; not supported")


def _parse_metadata(data: bytes, where: str) -> Any:
    """DCP ``Metadata`` from the bytes of a ``.metadata`` file, built without running code."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        TensorStorageMetadata,
    )

    try:
        md = _MetadataUnpickler(io.BytesIO(data), where).load()
    except ValueError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"checkpoint_id: {where} is not checkpoint metadata ({err!r})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ValueError(f"checkpoint_id: {where} is not checkpoint metadata "
                         f"(a {type(md).__name__})")
    for key, value in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(
                value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise ValueError(f"checkpoint_id: {where}: entry {key!r} is malformed")
    _check_storage(md, where)
    return md


def read_metadata(path: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` of a ``.metadata`` file, read without running code, and checked.

    Raises:
        ValueError: the file names a class that is no part of DCP metadata, is not a pickle,
            or describes storage outside its folder.
    """
    where = os.fspath(path)
    try:
        data = Path(where).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"checkpoint_id: {os.path.dirname(where)!r} holds no checkpoint "
                         "(no .metadata file)") from None
    return _parse_metadata(data, where)


# collectives over the default group (no-ops without one) -----------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _initialized() else 0


def _world() -> int:
    return dist.get_world_size() if _initialized() else 1


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not _initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not _initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "TypeError": TypeError, "FileExistsError": FileExistsError,
    "OSError": OSError, "RuntimeError": RuntimeError,
}


def _outcome(work: Callable[[], Any]) -> tuple[str, Any]:
    """``("ok", result)`` or ``(error type name, message)`` of ``work()``, to be sent to the
    other ranks (an error that stayed on one rank would leave the others waiting)."""
    try:
        return "ok", work()
    except Exception as err:
        kind = next((k for k, t in _ERRORS.items() if isinstance(err, t)), None)
        text = str(err) if kind else f"{type(err).__name__}: {err}"
        kind = kind or "RuntimeError"
        if isinstance(err, OSError) and err.filename is not None and kind == "OSError":
            text = f"checkpoint_id: {err.filename}: {err.strerror or err}"
        return kind, text


def _agree(outcomes: list[tuple[str, Any]]) -> Any:
    """The result when every outcome is ``ok``; else the first error, raised (on every rank,
    since every rank sees the same list)."""
    for kind, value in outcomes:
        if kind != "ok":
            raise _ERRORS[kind](value)
    return outcomes[0][1]


def _on_rank0(work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result (or its error, raised) on every rank."""
    outcome = _outcome(work) if _rank() == 0 else None
    return _agree([_broadcast(outcome)])


# checksums of data files --------------------------------------------------------------------


def _label(index: Any) -> str:
    """``ema.average.weight`` or ``ema.average.weight (shard at [5, 0])``."""
    fqn = getattr(index, "fqn", str(index))
    offset = getattr(index, "offset", None)
    return f"{fqn} (shard at {list(offset)})" if offset is not None and any(offset) else fqn


def _spans(md: Any) -> dict[str, list[tuple[int, int, str]]]:
    """file -> (offset, length, label) of every storage entry, in file order."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for key, info in md.storage_data.items():
        out.setdefault(info.relative_path, []).append((info.offset, info.length, _label(key)))
    return {f: sorted(s) for f, s in out.items()}


def _crc(f: Any, offset: int, length: int) -> str:
    f.seek(offset)
    crc, left = 0, length
    while left:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return f"crc32:{crc:08x}"


def _checksum_file(path: Path, spans: list[tuple[int, int, str]]) -> dict[str, Any]:
    """Size and ranges ``[offset, length, crc, label]`` tiling a data file (gaps get the
    label ``""``); the file is fsynced on the way."""
    ranges: list[list[Any]] = []
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        pos = 0
        for offset, length, label in spans:
            if offset < pos or offset + length > size:
                raise ValueError(f"checkpoint_id: {path}: entry {label!r} overlaps another or "
                                 "ends past the file")
            if offset > pos:
                ranges.append([pos, offset - pos, _crc(f, pos, offset - pos), ""])
            ranges.append([offset, length, _crc(f, offset, length), label])
            pos = offset + length
        if pos < size:
            ranges.append([pos, size - pos, _crc(f, pos, size - pos), ""])
        os.fsync(f.fileno())
    return {"size": size, "ranges": ranges}


def _verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    """Raise a ValueError naming ``path`` (and the tensor) unless the file is as recorded."""
    size = path.stat().st_size
    if size != entry["size"]:
        raise ValueError(f"checkpoint_id: {path} is truncated or changed: {size} bytes, "
                         f"{entry['size']} were written")
    pos = 0
    with open(path, "rb") as f:
        for offset, length, want, label in entry["ranges"]:
            if offset != pos:
                raise ValueError(f"checkpoint_id: {path}: its recorded ranges do not tile it")
            if _crc(f, offset, length) != want:
                span = f"bytes [{offset}, {offset + length})"
                what = f"tensor or value {label!r} ({span})" if label else span
                raise ValueError(f"checkpoint_id: {path}: {what} is corrupted (its bytes do "
                                 f"not match the checksum {want} written with it)")
            pos = offset + length
    if pos != size:
        raise ValueError(f"checkpoint_id: {path}: its recorded ranges do not tile it")


# the pointer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint's DCP files are, and what was recorded about them."""

    folder: Path  # the checkpoint_id
    data: Path  # the folder holding .metadata and the data files
    manifest: Mapping[str, Any] | None  # the pointer's content; None: emakit 0.1 layout


def _check_manifest(m: Any, where: Path) -> None:
    ok = (isinstance(m, dict) and m.get("format") == FORMAT
          and isinstance(m.get("data"), str) and _DATA.fullmatch(m["data"]) is not None
          and isinstance(m.get("metadata"), dict) and isinstance(m.get("files"), dict))
    if not ok:
        raise ValueError(f"checkpoint_id: {where} is not an emakit checkpoint pointer")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint_id: {where}: format_version {m.get('format_version')!r} "
                         f"is not {FORMAT_VERSION} (written by a newer emakit?)")


def _locate(folder: Path) -> CheckpointInfo:
    """The checkpoint in ``folder``, its pointer verified; a ValueError naming what is wrong."""
    if not folder.is_dir():
        raise ValueError(f"checkpoint_id: {str(folder)!r} is not a folder")
    pointer = folder / POINTER
    if pointer.is_file():
        manifest = read_sealed_json(pointer, what="checkpoint_id")
        _check_manifest(manifest, pointer)
        data = folder / manifest["data"]
        if not data.is_dir():
            raise ValueError(f"checkpoint_id: {pointer} names the data folder {data.name}, "
                             "which is missing")
        return CheckpointInfo(folder, data, manifest)
    if _DATA.fullmatch(folder.name) and (folder.parent / POINTER).is_file():
        raise ValueError(f"checkpoint_id: {str(folder)!r} is the data folder of the checkpoint "
                         f"in {str(folder.parent)!r}; load that folder")
    if (folder / _METADATA).is_file():
        return CheckpointInfo(folder, folder, None)
    raise ValueError(f"checkpoint_id: {str(folder)!r} holds no checkpoint (no {POINTER})")


def _metadata_of(info: CheckpointInfo) -> Any:
    """The checked DCP metadata of a located checkpoint (its SHA-256 first, if recorded)."""
    import hashlib

    path = info.data / _METADATA
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"checkpoint_id: {path} is missing") from None
    if info.manifest is not None:
        want = info.manifest["metadata"]
        if len(data) != want.get("size") or hashlib.sha256(data).hexdigest() != want.get(
                "sha256"):
            raise ValueError(f"checkpoint_id: {path} is corrupted or truncated (its bytes do "
                             "not match the SHA-256 in the pointer)")
    md = _parse_metadata(data, str(path))
    if info.manifest is not None:
        _check_covered(md, info.manifest, path)
    return md


def _check_covered(md: Any, manifest: Mapping[str, Any], where: Path) -> None:
    """Every storage entry is one of the recorded ranges, and every data file is recorded."""
    files = manifest["files"]
    for name, spans in _spans(md).items():
        entry = files.get(name)
        recorded = {(r[0], r[1]) for r in entry["ranges"]} if isinstance(entry, dict) else set()
        missing = [label for offset, length, label in spans if (offset, length) not in recorded]
        if missing:
            raise ValueError(f"checkpoint_id: {where}: no checksum recorded for {missing[0]!r} "
                             f"in {name}")


def read_checkpoint(checkpoint_id: str | os.PathLike) -> tuple[CheckpointInfo, Any]:
    """The located checkpoint and its DCP metadata, both verified (the data files are not
    read: :func:`load` verifies them). For ``emakit inspect``."""
    info = _locate(Path(path_arg(checkpoint_id, "checkpoint_id")))
    return info, _metadata_of(info)


# saving -----------------------------------------------------------------------------------


def _check_stateful(ema: Any) -> None:
    if not (callable(getattr(ema, "state_dict", None))
            and callable(getattr(ema, "load_state_dict", None))):
        raise TypeError(f"ema: expected an object with state_dict() and load_state_dict() (an "
                        f"emakit.EMA), got {type(ema).__name__} {ema!r:.60}")


def _current(folder: Path) -> dict[str, Any] | None:
    """The pointer's content; None if there is no readable pointer."""
    try:
        manifest = read_sealed_json(folder / POINTER, what="checkpoint_id")
        _check_manifest(manifest, folder / POINTER)
    except (OSError, ValueError):
        return None
    return manifest


def _remove_legacy(folder: Path) -> None:
    """The DCP files of an emakit 0.1 checkpoint, once a pointer has superseded them."""
    for entry in folder.iterdir():
        if _LEGACY.fullmatch(entry.name) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _collect(folder: Path, current: Mapping[str, Any] | None) -> None:
    """Remove what killed writers left: pointer temporaries, the data folder the current
    checkpoint replaced (if its writer died before removing it), and unreferenced data
    folders whose writer is gone (a live writer's, here or elsewhere, stay)."""
    keep = None if current is None else current["data"]
    replaced = None if current is None else current.get("replaces")
    reclaim_temporaries(folder)
    for entry in folder.iterdir():
        m = _DATA.fullmatch(entry.name)
        if m is None or entry.name == keep or not entry.is_dir():
            continue
        if entry.name == replaced or abandoned(m.group("tag")):
            shutil.rmtree(entry, ignore_errors=True)
    if keep is not None:
        _remove_legacy(folder)


def _begin(folder: Path, overwrite: bool) -> tuple[str, str | None]:
    """Rank 0: clean up, check for a checkpoint, make the new data folder. Returns its name
    and that of the data folder it is to replace."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_id: {str(folder)!r} is a file; expected a folder")
    folder.mkdir(parents=True, exist_ok=True)
    current = _current(folder)
    exists = (folder / POINTER).exists() or (folder / _METADATA).exists()
    if current is not None or not exists or overwrite:
        _collect(folder, current)
    if exists and not overwrite:
        raise FileExistsError(
            f"checkpoint_id: {str(folder)!r} already holds a checkpoint; pass overwrite=True to "
            "replace it, or save to a new folder"
        )
    name = f"dcp-{owner_tag()}-{uuid.uuid4().hex[:8]}"
    (folder / name).mkdir()
    return name, None if current is None else current["data"]


def _checksum_mine(md: Any, data: Path) -> dict[str, Any]:
    """Checksums of the data files this rank wrote (DCP names them ``__<rank>_<n>.distcp``;
    rank 0 also takes any other name)."""
    rank, world = _rank(), _world()
    out = {}
    for name, spans in _spans(md).items():
        m = re.fullmatch(r"__([0-9]+)_[0-9]+\.distcp", name)
        writer = int(m.group(1)) if m and int(m.group(1)) < world else 0
        if writer == rank:
            out[name] = _checksum_file(data / name, spans)
    return out


def _manifest(data: Path, files: dict[str, Any], replaces: str | None) -> dict[str, Any]:
    """Rank 0: the pointer's content, after checking ``.metadata`` is what load accepts."""
    import hashlib

    from ._version import __version__

    raw = (data / _METADATA).read_bytes()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "emakit_version": __version__,
        "data": data.name, "replaces": replaces, "written_ns": time.time_ns(),
        "ranks": _world(),
        "metadata": {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()},
        "files": files,
    }
    _check_covered(_parse_metadata(raw, str(data / _METADATA)), manifest, data / _METADATA)
    return manifest


def _publish(folder: Path, data: Path, files: dict[str, Any], overwrite: bool,
             old: str | None) -> None:
    """Rank 0: switch the pointer to ``data`` (the atomic step), then drop what it replaced
    (``old``, recorded in the new pointer, so the next save removes it if this one dies
    first). The loser of a race without ``overwrite`` removes its data and raises
    FileExistsError."""
    try:
        manifest = _manifest(data, files, old)
        fsync_dir(data)
        write_sealed_json(folder / POINTER, manifest, overwrite=overwrite)
    except FileExistsError:
        shutil.rmtree(data, ignore_errors=True)
        raise FileExistsError(f"checkpoint_id: {str(folder)!r}: another save wrote a checkpoint "
                              "here first; pass overwrite=True to replace it") from None
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    fsync_dir(folder)
    if old is not None and old != data.name:
        shutil.rmtree(folder / old, ignore_errors=True)
    _remove_legacy(folder)


def save(ema: Any, checkpoint_id: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``ema.state_dict()`` with ``torch.distributed.checkpoint`` (a collective: every
    rank calls it). Under FSDP2 each rank writes its shards; the folder loads on any number
    of ranks (see :func:`load`), or in one process without a process group.

    The checkpoint is written into a fresh data folder, checksummed, and switched in by one
    atomic rename of the folder's pointer (see the module's docstring): a crash at any moment
    leaves the previous checkpoint or this one loadable, never a mix. A checkpoint already in
    the folder is a FileExistsError (on every rank) unless ``overwrite=True``; of two saves
    racing into one new folder exactly one wins, the other raises FileExistsError.
    """
    import torch.distributed.checkpoint as dcp

    _check_stateful(ema)
    folder = Path(path_arg(checkpoint_id, "checkpoint_id"))
    overwrite = flag(overwrite, "overwrite")
    name, old = _on_rank0(lambda: _begin(folder, overwrite))
    data = folder / name
    try:
        writer = dcp.FileSystemWriter(str(data), overwrite=False)
        md = dcp.save({"ema": ema.state_dict()}, storage_writer=writer)
        files = _outcome(lambda: _checksum_mine(md, data))
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(data, ignore_errors=True)
        raise
    outcomes = _gather(files)
    _on_rank0(lambda: _publish(folder, data, _merge(outcomes, data), overwrite, old))


def _merge(outcomes: list[tuple[str, Any]], data: Path) -> dict[str, Any]:
    try:
        per_rank = [_agree([o]) for o in outcomes]
    except BaseException:
        shutil.rmtree(data, ignore_errors=True)
        raise
    return {name: entry for files in per_rank for name, entry in files.items()}


# loading ----------------------------------------------------------------------------------


def _reader(path: str, md: Any):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file-system reader, handing out the metadata :func:`read_metadata` read."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(path)


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """DCP's planner, with non-tensor values read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except Exception:
                raise ValueError(
                    f"checkpoint_id: value {read_item.dest_index.fqn!r} is not plain data "
                    "(torch.load(weights_only=True) refuses it: it could run code)"
                ) from None
            # hand the parent a stream of the checked object: it then unpickles only what
            # torch.save just wrote from plain data
            buf = io.BytesIO()
            torch.save(obj, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return SafePlanner()


def _verify(info: CheckpointInfo) -> Any:
    """This rank's checks: the metadata, and its share of the data files (file i of the
    sorted names on rank i % world). Returns the metadata."""
    md = _metadata_of(info)
    if info.manifest is not None:
        names = sorted(info.manifest["files"])
        for i, name in enumerate(names):
            if i % _world() == _rank():
                try:
                    _verify_file(info.data / name, info.manifest["files"][name])
                except FileNotFoundError:
                    raise ValueError(f"checkpoint_id: {info.data / name} is missing (replaced "
                                     "by another save while loading?)") from None
    return md


def load(ema: Any, checkpoint_id: str | os.PathLike) -> None:
    """Read what :func:`save` wrote into ``ema``, resharded to this run's ranks (a collective).

    Every checksum is verified first (the ranks share the files), then the state is read;
    never unpickles code (see the module's docstring). A corrupted, truncated, crafted or
    foreign folder is a ValueError naming the file (and the tensor), on every rank. Example
    (one process, no process group)::

        >>> import tempfile, warnings, torch, emakit
        >>> from emakit import checkpoint
        >>> model = torch.nn.Linear(3, 2)
        >>> ema = emakit.EMA(model, half_life="10ba"); ema.step()
        >>> folder = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # DCP: "torch.distributed is disabled"
        ...     checkpoint.save(ema, folder)
        ...     again = emakit.EMA(model, half_life="10ba")
        ...     checkpoint.load(again, folder)
        >>> again.num_updates == ema.num_updates
        True
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    _check_stateful(ema)
    folder = Path(path_arg(checkpoint_id, "checkpoint_id"))
    info = _on_rank0(lambda: _locate(folder))
    mine = _outcome(lambda: _verify(info))
    _agree(_gather(("ok", None) if mine[0] == "ok" else mine))  # all raise, or none
    md = mine[1]
    state = {"ema": ema.state_dict()}
    try:
        dcp.load(state, storage_reader=_reader(str(info.data), md), planner=_planner())
    except CheckpointException as err:  # DCP wraps each rank's error; say the first plainly
        exc = next(iter(err.failures.values()))[0]
        if isinstance(exc, ValueError) and str(exc).startswith("checkpoint_id"):
            raise ValueError(str(exc)) from None
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ValueError(f"checkpoint_id: {str(folder)!r} could not be loaded into this EMA: "
                         f"{line}") from None
    ema.load_state_dict(state["ema"])
