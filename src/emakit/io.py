"""Files: safetensors written atomically and streamed tensor by tensor, checked on load.

Nothing here unpickles: weights are read with ``safetensors.safe_open`` and the metadata is
JSON inside the safetensors header.

Writes go to a temporary name in the destination folder, are flushed and ``fsync``-ed, then
given their final name with ``os.link`` (which refuses to replace an existing file) or, where
hard links are not supported, ``os.replace`` after a check. A writer killed mid-way leaves
only a hidden ``.*.tmp`` file, never a truncated file under a final name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

__all__ = [
    "DTYPE_CODES",
    "atomic_file",
    "save_torch",
    "write_safetensors",
    "read_metadata",
    "read_tensors",
    "model_fingerprint",
    "dtype_name",
    "dtype_from_name",
    "is_temporary",
    "read_header",
    "tensor_checksum",
    "verify_checksum",
    "CHECKSUMS_KEY",
]

#: torch dtype -> safetensors dtype code
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        DTYPE_CODES[getattr(torch, _name)] = _code

_TMP_SUFFIX = ".tmp"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; a ValueError naming ``what`` otherwise."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{what}: unknown dtype {name!r}")
    return dtype


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a temporary file left by an unfinished write."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(_TMP_SUFFIX)


def model_fingerprint(shapes: Iterable[tuple[str, Iterable[int]]]) -> str:
    """SHA-256 (hex, first 32 digits) of the sorted (name, shape) pairs of a state dict.

    Two models with the same names and shapes share a fingerprint; dtypes and values do
    not enter it.
    """
    items = sorted((str(n), [int(s) for s in shape]) for n, shape in shapes)
    text = json.dumps(items, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give ``tmp`` the name ``path``; FileExistsError if ``path`` exists and not overwrite."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if path exists
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK):
            raise
        if path.exists():  # no hard links here: check, then rename
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing; on a clean exit flush and
    ``fsync`` it and give it the name ``path``. A writer that fails or is killed leaves no file
    under ``path`` (only, if killed, a hidden temporary). Without ``overwrite`` an existing
    ``path`` raises FileExistsError and is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def save_torch(obj: object, path: str | os.PathLike, overwrite: bool = True) -> None:
    """``torch.save`` through :func:`atomic_file`: a reader sees the old file or the new one,
    never half of one."""
    with atomic_file(path, overwrite=overwrite) as f:
        torch.save(obj, f)


#: metadata key of the per-tensor checksums written by ``write_safetensors(checksums=True)``
CHECKSUMS_KEY = "checksums"
_CRC_PLACEHOLDER = "crc32:" + "0" * 8


def _bytes_of(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    nbytes = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * nbytes).from_address(t.data_ptr())) if nbytes else (
        memoryview(b""))


def tensor_checksum(t: Tensor) -> str:
    """``"crc32:<8 hex digits>"`` of a tensor's bytes as stored (CPU, contiguous,
    little-endian), the checksum :func:`write_safetensors` records per tensor.

    >>> tensor_checksum(torch.zeros(2, dtype=torch.float32))  # zlib.crc32(bytes(8))
    'crc32:6522df69'
    """
    data = t.detach().cpu().contiguous()
    return f"crc32:{zlib.crc32(_bytes_of(data)):08x}"


def verify_checksum(t: Tensor, name: str, checksums: Mapping[str, str], path: Path,
                    what: str = "file") -> None:
    """Raise a ValueError naming ``path`` and ``name`` if ``t``'s bytes do not match the
    checksum recorded for ``name`` (no check when none is recorded)."""
    want = checksums.get(name)
    if want is not None and tensor_checksum(t) != want:
        raise ValueError(f"{what}: {path}: tensor {name!r} is corrupted (its bytes do not "
                         f"match the checksum {want} in the file's header)")


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor] | tuple[str, Tensor, torch.dtype]],
    metadata: Mapping[str, str],
    overwrite: bool = False,
    checksums: bool = False,
) -> Path:
    """Write ``tensors`` to a safetensors file, atomically.

    ``tensors`` is a mapping name -> tensor, or ``(name, tensor)`` / ``(name, tensor, dtype)``
    items; with a dtype the tensor is cast as it is written. Tensors are converted and
    streamed one at a time, so the host memory needed is one tensor, not the whole file (and
    tensors may live on an accelerator or share storage). ``metadata`` values must be strings.
    Without ``overwrite``, an existing ``path`` raises FileExistsError and is left untouched.
    ``checksums``: record :func:`tensor_checksum` of every tensor under the metadata key
    ``"checksums"`` (JSON, name -> checksum), computed from the bytes as they are written.
    """
    if sys.byteorder != "little":  # safetensors is little-endian
        raise RuntimeError("write_safetensors: only little-endian hosts are supported")
    path = Path(path)
    raw = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    items = [(it[0], it[1], it[2] if len(it) > 2 else it[1].dtype) for it in raw]
    meta = {str(k): str(v) for k, v in metadata.items()}
    crcs = {name: _CRC_PLACEHOLDER for name, _, _ in items} if checksums else None
    if crcs is not None:
        meta[CHECKSUMS_KEY] = dumps(crcs)
    header: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name, t, dtype in items:
        if dtype not in DTYPE_CODES:
            raise TypeError(f"tensor {name!r}: dtype {dtype} cannot be written")
        if name in header:
            raise ValueError(f"tensor name {name!r} appears twice")
        nbytes = t.numel() * dtype.itemsize
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    def encode() -> bytes:
        blob = json.dumps(header, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)

    blob = encode()
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, t, dtype in items:
            if t.numel() == 0:
                if crcs is not None:
                    crcs[name] = f"crc32:{zlib.crc32(b''):08x}"
                continue
            data = t.detach().to(device="cpu", dtype=dtype).contiguous()
            if (dtype != t.dtype and data.is_floating_point()
                    and not bool(torch.isfinite(data).all())):
                warnings.warn(
                    f"emakit: tensor {name!r} holds values that are not finite in {dtype} "
                    f"(overflow from {t.dtype}?) in {path.name}; store a wider dtype",
                    RuntimeWarning,
                    stacklevel=3,
                )
            raw = _bytes_of(data)
            if crcs is not None:
                crcs[name] = f"crc32:{zlib.crc32(raw):08x}"
            f.write(raw)
            del raw, data
        if crcs is not None:  # same length as the placeholders: rewrite the header in place
            meta[CHECKSUMS_KEY] = dumps(crcs)
            final = encode()
            if len(final) != len(blob):
                raise RuntimeError("write_safetensors: checksum header changed length")
            f.seek(8)
            f.write(final)
    return path


def _open_error(path: Path, err: Exception, what: str) -> ValueError:
    return ValueError(
        f"{what}: {path} is not a complete safetensors file (truncated, or another format): "
        f"{err}"
    )


def read_header(
    path: str | os.PathLike, what: str = "file"
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The ``__metadata__`` of a safetensors file and, per tensor, its dtype code and shape,
    without reading any tensor data. A truncated or foreign file raises a ValueError naming
    it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {}
            for k in f.keys():
                sl = f.get_slice(k)
                tensors[k] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
            return dict(f.metadata() or {}), tensors
    except FileNotFoundError:
        raise
    except Exception as err:  # SafetensorError derives from Exception only
        raise _open_error(path, err, what) from None


def read_metadata(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, str], list[str]]:
    """The ``__metadata__`` and the tensor names of a safetensors file, without reading any
    tensor data. A truncated or foreign file raises a ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), list(f.keys())
    except FileNotFoundError:
        raise
    except Exception as err:  # SafetensorError derives from Exception only
        raise _open_error(path, err, what) from None


@contextlib.contextmanager
def read_tensors(path: str | os.PathLike, what: str = "file"):
    """Context manager yielding a ``safe_open`` handle; tensors are read one at a time with
    ``handle.get_tensor(name)``. Errors name the file."""
    from safetensors import safe_open

    path = Path(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError:
        raise
    except Exception as err:
        raise _open_error(path, err, what) from None
    with handle as f:
        yield f


def dumps(value: object) -> str:
    """JSON for safetensors metadata (which holds strings only)."""
    return json.dumps(value, separators=(",", ":"))
