"""Distributed checkpoints of an EMA: sharded, reloadable on any number of ranks, and safe to
load from a folder nobody vouches for.

:func:`save` writes ``EMA.state_dict()`` with ``torch.distributed.checkpoint`` (DCP): under
FSDP2 every rank writes its own shards, and :func:`load` reshards them to the ranks of the run
that loads. DCP itself unpickles twice on load: the folder's ``.metadata`` file with
``pickle.load``, and every non-tensor value (counters, the configuration) with
``torch.load(weights_only=False)``. Either runs whatever code a crafted file names. :func:`load`
therefore reads through

- a restricted unpickler for ``.metadata`` that admits only DCP's metadata classes, ``torch.Size``,
  dtypes, layouts and paths, then checks the result (every storage entry a plain file name in the
  folder, with whole-number offsets), and
- ``torch.load(weights_only=True)`` for non-tensor values; tensors DCP already reads that way.

A file that names anything else is a ValueError naming the file; nothing in it runs.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ._engine.collectives import all_ranks


class EMA(Protocol):
    """What a checkpoint holds: anything with ``state_dict()`` and ``load_state_dict()``
    (an :class:`~emakit.EMA`, :class:`~emakit.BEMA` or :class:`~emakit.PostHocEMA`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

__all__ = ["save", "load", "read_metadata", "write_state", "read_state"]

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


def read_metadata(path: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` of a checkpoint file, read without running code, and checked.

    Raises:
        ValueError: the file names a class that is no part of DCP metadata, is not a pickle,
            or describes storage outside its folder.
    """
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        TensorStorageMetadata,
    )

    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, where).load()
    except ValueError:
        raise
    except FileNotFoundError:
        raise ValueError(f"checkpoint_id: {os.path.dirname(where)!r} holds no checkpoint "
                         "(no .metadata file)") from None
    except Exception as err:  # truncated or not a pickle at all
        raise ValueError(f"checkpoint_id: {where} is not checkpoint metadata ({err!r})") from None
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise ValueError(f"checkpoint_id: {where} is not checkpoint metadata "
                         f"(a {type(md).__name__})")
    for key, value in md.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(
                value, (TensorStorageMetadata, BytesStorageMetadata)):
            raise ValueError(f"checkpoint_id: {where}: entry {key!r} is malformed")
    storage = md.storage_data
    if not isinstance(storage, dict):
        raise ValueError(f"checkpoint_id: {where}: storage table is malformed")
    for key, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not _plain_name(rel):
            raise ValueError(
                f"checkpoint_id: {where}: entry {getattr(key, 'fqn', key)!r} points at "
                f"{rel!r}, outside the checkpoint folder"
            )
        if not (_whole(getattr(info, "offset", None)) and _whole(getattr(info, "length", None))):
            raise ValueError(f"checkpoint_id: {where}: entry {getattr(key, 'fqn', key)!r} has "
                             "a malformed offset or length")
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"checkpoint_id: {where}: entry {getattr(key, 'fqn', key)!r} needs "
                             f"storage transforms {info.transform_descriptors!r}; not supported")
    return md


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


def _everywhere(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce), or here without a group."""
    return all_ranks(flag)


def save(ema: EMA, checkpoint_id: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``ema.state_dict()`` with ``torch.distributed.checkpoint`` (a collective: every
    rank calls it). Under FSDP2 each rank writes its shards; the folder loads on any number
    of ranks (see :func:`load`), or in one process without a process group. A checkpoint
    already in the folder is a FileExistsError (on every rank) unless ``overwrite=True``; the
    folder's metadata is written last (temporary name, then rename), so a crash leaves no
    loadable half."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(checkpoint_id)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint_id: {path!r} is a file; expected a folder")
    # a rank that sees a checkpoint tells the others: all raise, none hangs
    exists = not _everywhere(not os.path.exists(os.path.join(path, ".metadata")))
    if exists and not overwrite:
        raise FileExistsError(
            f"checkpoint_id: {path!r} already holds a checkpoint; pass overwrite=True to "
            "replace it, or save to a new folder"
        )
    writer = dcp.FileSystemWriter(path, overwrite=overwrite)
    dcp.save({"ema": ema.state_dict()}, storage_writer=writer)


def load(ema: EMA, checkpoint_id: str | os.PathLike) -> None:
    """Read what :func:`save` wrote into ``ema``, resharded to this run's ranks (a collective).

    Never unpickles code (see the module's docstring); a crafted or foreign folder is a
    ValueError naming the file. Example (one process, no process group)::

        >>> import tempfile, warnings, torch, emakit
        >>> from emakit import checkpoint
        >>> model = torch.nn.Linear(3, 2)
        >>> ema = emakit.EMA(model, half_life="10ba"); ema.step()
        >>> folder = tempfile.mkdtemp()
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")  # DCP: "torch.distributed is disabled"
        ...     checkpoint.save(ema, folder, overwrite=True)
        ...     again = emakit.EMA(model, half_life="10ba")
        ...     checkpoint.load(again, folder)
        >>> again.num_updates == ema.num_updates
        True
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = os.fspath(checkpoint_id)
    md, error = None, None
    try:
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint_id: {path!r} is not a folder")
        md = read_metadata(Path(path) / ".metadata")
    except ValueError as err:
        error = err
    if not _everywhere(error is None):  # every rank raises, none waits in a collective
        raise error or ValueError(f"checkpoint_id: {path!r} is refused on another rank")
    state = {"ema": ema.state_dict()}
    try:
        dcp.load(state, storage_reader=_reader(path, md), planner=_planner())
    except CheckpointException as err:  # DCP wraps each rank's error; say the first plainly
        exc = next(iter(err.failures.values()))[0]
        if isinstance(exc, ValueError) and str(exc).startswith("checkpoint_id"):
            raise ValueError(str(exc)) from None
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise ValueError(f"checkpoint_id: {path!r} could not be loaded into this EMA: "
                         f"{line}") from None
    ema.load_state_dict(state["ema"])


# one-file states without pickle ------------------------------------------------------------

STATE_FORMAT = "emakit.state"


def _encode(value: Any, where: str, tensors: list[tuple[str, torch.Tensor]]) -> Any:
    """The JSON tree of a state: tensors become ``{"__tensor__": key}``."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        raise TypeError(f"state{where}: a DTensor (sharded under FSDP2); write sharded states "
                        "with emakit.checkpoint.save")
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors.append((key, value))
        return {"__tensor__": key}
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"state{where}: key {bad[0]!r} is not a string")
        if "__tensor__" in value or "__tuple__" in value or "__float__" in value:
            raise ValueError(f"state{where}: a key is reserved by the file format")
        return {k: _encode(v, f"{where}[{k!r}]", tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state{where}: a {type(value).__name__} cannot be stored (tensors, dicts, "
                    "lists, tuples, numbers, strings and None can)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(node, dict):
        if set(node) == {"__tensor__"}:
            try:
                return tensors[node["__tensor__"]]
            except (KeyError, TypeError):
                raise ValueError(f"path: {path}: its state names a tensor it does not "
                                 "hold") from None
        if set(node) == {"__tuple__"}:
            return tuple(_decode(v, tensors, path) for v in node["__tuple__"])
        if set(node) == {"__float__"}:
            return float(node["__float__"])
        return {k: _decode(v, tensors, path) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    return node


def write_state(state: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a state dict (``EMA.state_dict()``, ``PostHocEMA.state_dict()``, ...) to one
    safetensors file, atomically: tensors as safetensors tensors with a checksum each, the
    rest as JSON in the header. Nothing is pickled, so :func:`read_state` runs no code whoever
    wrote the file. Tensors must be whole (no DTensors: see :func:`save`).

    >>> import tempfile, os, torch, emakit
    >>> ema = emakit.EMA(torch.nn.Linear(3, 2), half_life="10ba"); ema.step()
    >>> path = os.path.join(tempfile.mkdtemp(), "ema.safetensors")
    >>> _ = write_state(ema.state_dict(), path)
    >>> again = emakit.EMA(torch.nn.Linear(3, 2), half_life="10ba")
    >>> again.load_state_dict(read_state(path))
    >>> all(torch.equal(a, b) for a, b in zip(again.state_dict()["average"].values(),
    ...                                       ema.state_dict()["average"].values()))
    True
    """
    import json

    from .io import write_safetensors

    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
    tensors: list[tuple[str, torch.Tensor]] = []
    tree = _encode(dict(state), "", tensors)
    meta = {"format": STATE_FORMAT, "format_version": "1",
            "state": json.dumps(tree, separators=(",", ":"), allow_nan=False)}
    return write_safetensors(path, tensors, meta, overwrite=overwrite, checksums=True)


def read_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`write_state` (tensors on ``device``), checking every
    tensor's checksum. A foreign, truncated or corrupted file is a ValueError naming it."""
    import json

    from .io import CHECKSUMS_KEY, read_header, read_tensors, verify_checksum

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {str(path)!r} is not a file")
    meta, shapes = read_header(path, what="path")
    if meta.get("format") != STATE_FORMAT or meta.get("format_version") != "1":
        raise ValueError(f"path: {path} is not an emakit state file (format "
                         f"{meta.get('format')!r}, version {meta.get('format_version')!r})")
    try:
        tree = json.loads(meta["state"])
        sums = json.loads(meta[CHECKSUMS_KEY])
    except (KeyError, ValueError) as err:
        raise ValueError(f"path: {path}: bad header ({err!r})") from None
    if not isinstance(sums, dict) or set(sums) != set(shapes):
        raise ValueError(f"path: {path}: its checksums do not cover its tensors")
    tensors = {}
    with read_tensors(path, what="path") as f:
        for key in shapes:
            t = f.get_tensor(key)
            verify_checksum(t, key, sums, path, "path")
            tensors[key] = t.to(device)
    state = _decode(tree, tensors, path)
    if not isinstance(state, dict):
        raise ValueError(f"path: {path}: its state is not a mapping")
    return state
