"""One-file states without pickle: the safe state format every adapter writes.

:func:`write_state` stores a state dict (``EMA.state_dict()``, ``PostHocEMA.state_dict()``,
anything made of tensors, dicts, lists, tuples, numbers, strings and None) in one safetensors
file: the tensors as safetensors tensors, the rest as JSON in the header. The file is written
atomically (a crash leaves the old file or the new one) and sealed: a CRC-32 of every
tensor's bytes and a SHA-256 of the header (see :mod:`emakit.io`), so :func:`read_state`
turns any changed byte into a ValueError naming the file. Nothing is pickled, so reading runs
no code whoever wrote the file.

File format 2 (this version) is sealed; format 1 (emakit 0.1, tensor checksums only) still
reads, and so do files written by ``torch.save`` (read with ``weights_only=True``), which the
Transformers callback wrote before.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ._args import flag, path_arg
from ._engine.tensors import is_dtensor
from .io import (
    CHECKSUMS_KEY,
    HEADER_CHECKSUM_KEY,
    read_header,
    read_tensors,
    verify_checksum,
    write_safetensors,
)

__all__ = ["write_state", "read_state", "STATE_FORMAT", "STATE_VERSION"]

STATE_FORMAT = "emakit.state"
#: 2: the header is sealed (its SHA-256 in it); 1 (read only): tensor checksums only
STATE_VERSION = "2"
_RESERVED = ("__tensor__", "__tuple__", "__float__")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode_dict(value: dict, where: str, tensors: list[tuple[str, torch.Tensor]]) -> dict:
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"state{where}: key {bad[0]!r} is not a string")
    if any(k in value for k in _RESERVED):
        raise ValueError(f"state{where}: a key is reserved by the file format")
    return {k: _encode(v, f"{where}[{k!r}]", tensors) for k, v in value.items()}


def _encode(value: Any, where: str, tensors: list[tuple[str, torch.Tensor]]) -> Any:
    """The JSON tree of a state: tensors become ``{"__tensor__": key}``."""
    if is_dtensor(value):
        raise TypeError(f"state{where}: a DTensor (sharded under FSDP2); write sharded states "
                        "with emakit.checkpoint.save")
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors.append((key, value))
        return {"__tensor__": key}
    if isinstance(value, dict):
        return _encode_dict(value, where, tensors)
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{where}[{i}]", tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple__": items}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state{where}: a {type(value).__name__} cannot be stored (tensors, dicts, "
                    "lists, tuples, numbers, strings and None can)")


def _decode(node: Any, tensors: dict[str, torch.Tensor], path: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, path) for v in node]
    if not isinstance(node, dict):
        return node
    if set(node) == {"__tensor__"}:
        key = node["__tensor__"]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"path: {path}: its state names a tensor it does not hold")
        return tensors[key]
    if set(node) == {"__tuple__"} and isinstance(node["__tuple__"], list):
        return tuple(_decode(v, tensors, path) for v in node["__tuple__"])
    if set(node) == {"__float__"}:
        if node["__float__"] not in _NONFINITE:
            raise ValueError(f"path: {path}: its state holds a malformed number "
                             f"{node['__float__']!r}")
        return _NONFINITE[node["__float__"]]
    if any(k in node for k in _RESERVED):
        raise ValueError(f"path: {path}: its state holds a malformed {sorted(node)} entry")
    return {k: _decode(v, tensors, path) for k, v in node.items()}


def _file_path(path: Any, name: str = "path") -> Path:
    """A file name to write: a TypeError for a non-path, a ValueError for a folder."""
    p = Path(path_arg(path, name))
    if p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a folder; expected a file name")
    return p


def write_state(state: Mapping[str, Any], path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a state dict (``EMA.state_dict()``, ``PostHocEMA.state_dict()``, ...) to one
    safetensors file, atomically: tensors as safetensors tensors with a checksum each, the
    rest as JSON in the header, which is sealed by its own checksum. Nothing is pickled, so
    :func:`read_state` runs no code whoever wrote the file. Tensors must be whole (no
    DTensors: see :func:`emakit.checkpoint.save`). Without ``overwrite`` an existing file is a
    FileExistsError and is left untouched.

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
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping, got {type(state).__name__}")
    target = _file_path(path)
    overwrite = flag(overwrite, "overwrite")
    tensors: list[tuple[str, torch.Tensor]] = []
    tree = _encode(dict(state), "", tensors)
    meta = {"format": STATE_FORMAT, "format_version": STATE_VERSION,
            "state": json.dumps(tree, separators=(",", ":"), allow_nan=False)}
    return write_safetensors(target, tensors, meta, overwrite=overwrite, checksums=True)


def _device(device: Any) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if isinstance(device, (str, int)) and not isinstance(device, bool):
        try:
            return torch.device(device)
        except (RuntimeError, ValueError):
            pass
    raise ValueError(f"device: expected a torch.device or a device string such as 'cpu' or "
                     f"'cuda:0', got {device!r}")


def _read_torch(path: Path, device: torch.device) -> dict[str, Any]:
    """A state written by ``torch.save`` (before the safe format), read with
    ``weights_only=True``: plain data only, no code runs."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"path: {path} holds objects that are not plain data; refused "
                         f"(unpickling them could run code): {str(err).splitlines()[0]}") from None
    except Exception as err:  # zip or pickle framing: truncated, or another format
        raise ValueError(f"path: {path} is not a complete torch file (truncated, or another "
                         f"format): {type(err).__name__}") from None
    if not isinstance(state, dict):
        raise ValueError(f"path: {path}: its state is a {type(state).__name__}, not a mapping")
    return state


def _header(path: Path) -> tuple[Any, dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The state tree and the tensor checksums of a state file, after every header check."""
    meta, shapes = read_header(path, what="path")  # verifies a sealed header
    version = meta.get("format_version")
    if meta.get("format") != STATE_FORMAT or version not in ("1", STATE_VERSION):
        raise ValueError(f"path: {path} is not an emakit state file (format "
                         f"{meta.get('format')!r}, version {version!r})")
    if version != "1" and HEADER_CHECKSUM_KEY not in meta:
        raise ValueError(f"path: {path}: its header checksum is missing (format {version} "
                         "seals its header)")
    try:
        tree = json.loads(meta["state"])
        sums = json.loads(meta[CHECKSUMS_KEY])
    except (KeyError, ValueError) as err:
        raise ValueError(f"path: {path}: bad header ({err!r})") from None
    if not isinstance(sums, dict) or set(sums) != set(shapes):
        raise ValueError(f"path: {path}: its checksums do not cover its tensors")
    return tree, sums, shapes


def read_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a state written by :func:`write_state` (tensors on ``device``), checking the
    header's and every tensor's checksum. A foreign, truncated or corrupted file is a
    ValueError naming it. A file written by ``torch.save`` loads too, with
    ``weights_only=True`` (no checksums there)."""
    path = Path(path_arg(path, "path"))
    device = _device(device)
    if not path.is_file():
        raise ValueError(f"path: {str(path)!r} is not a file")
    with open(path, "rb") as f:
        magic = f.read(9)
    # a safetensors file: an 8-byte length, then "{"; else a torch.save zip or legacy pickle
    if magic[8:] != b"{" and (magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"):
        return _read_torch(path, device)
    tree, sums, shapes = _header(path)
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
