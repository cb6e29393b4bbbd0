"""Files: safetensors written atomically and streamed tensor by tensor, checked on load.

Nothing here unpickles: weights are read with ``safetensors.safe_open`` and the metadata is
JSON inside the safetensors header.

Writes go to a temporary name in the destination folder, are flushed and ``fsync``-ed, then
given their final name with ``os.link`` (which refuses to replace an existing file) or, where
hard links are not supported, ``os.replace`` after a check. A writer killed mid-way leaves
only a hidden ``.<name>.<owner>.<random>.tmp`` file, never a truncated file under a final
name; the owner tag names the host and process, so the next write of the same name removes
the temporaries whose process is gone (:func:`reclaim_temporaries`).

Checksums: ``write_safetensors(checksums=True)`` records the CRC-32 of every tensor's bytes
and the SHA-256 of the header itself (:data:`HEADER_CHECKSUM_KEY`), so every byte of the file
is covered: the 8-byte length and the header by the SHA-256, the data (which the tensors tile
exactly: safetensors refuses gaps and trailing bytes) by the CRC-32s. CRC-32 detects every
change of up to 32 consecutive bits, every single- and double-bit error in a tensor, and any
other change but with probability 2**-32.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import socket
import sys
import uuid
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

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
    "HEADER_CHECKSUM_KEY",
    "owner_tag",
    "pid_alive",
    "abandoned",
    "reclaim_temporaries",
    "write_sealed_json",
    "read_sealed_json",
    "verify_header",
    "fsync_dir",
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


# owners of temporaries -------------------------------------------------------------------


def _machine() -> str:
    """8 hex digits naming this host and its process-id namespace (two containers on one
    host share a host name but not their pids)."""
    ns = ""
    with contextlib.suppress(OSError):
        ns = os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(f"{socket.gethostname()}\0{ns}".encode()).hexdigest()[:8]


def owner_tag() -> str:
    """``"<machine>-<pid>"``: who writes a temporary, as it goes into the temporary's name."""
    return f"{_machine()}-{os.getpid()}"


_TAG = re.compile(r"([0-9a-f]{8})-([0-9]+)")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie, finished but not yet reaped,
    does not)."""
    if pid <= 0:  # os.kill(0 or -1, 0) would ask about whole process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    with contextlib.suppress(OSError, IndexError):  # Linux: a zombie has finished
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    return True


def abandoned(tag: str) -> bool:
    """Whether the writer named by an :func:`owner_tag` is provably gone: it ran on this
    machine and its process no longer exists. A writer on another machine is never presumed
    gone (it may still be writing), nor is this very process."""
    m = _TAG.fullmatch(tag)
    if m is None or m.group(1) != _machine():
        return False
    pid = int(m.group(2))
    return pid != os.getpid() and not pid_alive(pid)


_TMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<tag>[0-9a-f]{8}-[0-9]+)\.[0-9a-f]{8}\.tmp")


def reclaim_temporaries(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` (of the file named ``target``, or of any) that
    writers killed mid-write left behind, and return their paths. Only temporaries whose
    writer is :func:`abandoned` are removed: a live writer's (here or on another machine)
    stays."""
    removed = []
    with contextlib.suppress(OSError), os.scandir(os.fspath(folder)) as entries:
        for entry in entries:
            m = _TMP_NAME.fullmatch(entry.name)
            if m is None or (target is not None and m.group("target") != target):
                continue
            if abandoned(m.group("tag")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder, so the names just created or renamed in it survive a crash."""
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
    under ``path`` (only, if killed, a hidden temporary, which the next write of ``path``
    removes). Without ``overwrite`` an existing ``path`` raises FileExistsError and is left
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reclaim_temporaries(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.{owner_tag()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)


def save_torch(obj: object, path: str | os.PathLike, overwrite: bool = True) -> None:
    """``torch.save`` through :func:`atomic_file`: a reader sees the old file or the new one,
    never half of one."""
    with atomic_file(path, overwrite=overwrite) as f:
        torch.save(obj, f)


# sealed JSON -------------------------------------------------------------------------------

_SEAL = b"emakit-sealed-json/1 sha256:"


def write_sealed_json(path: str | os.PathLike, value: object, overwrite: bool = False) -> Path:
    """Write ``value`` as JSON under a SHA-256 of its bytes, atomically (see
    :func:`atomic_file`): ``emakit-sealed-json/1 sha256:<64 hex>\\n<json>\\n``."""
    body = json.dumps(value, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(_SEAL + hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    return Path(path)


def read_sealed_json(path: str | os.PathLike, what: str = "file") -> Any:
    """What :func:`write_sealed_json` wrote; a ValueError naming ``path`` for any other
    content (a changed, truncated or foreign file)."""
    data = Path(path).read_bytes()
    head = len(_SEAL) + 64
    digest = data[len(_SEAL):head]
    body = data[head + 1:]
    if (not data.startswith(_SEAL) or data[head:head + 1] != b"\n"
            or hashlib.sha256(body).hexdigest().encode() != digest):
        raise ValueError(f"{what}: {path} is corrupted or truncated (its content does not "
                         "match its SHA-256)")
    try:
        return json.loads(body)
    except ValueError as err:  # a sealed file that is no JSON: written by something else
        raise ValueError(f"{what}: {path} is not JSON ({err})") from None


# safetensors -------------------------------------------------------------------------------

#: metadata key of the per-tensor checksums written by ``write_safetensors(checksums=True)``
CHECKSUMS_KEY = "checksums"
#: metadata key of the header's own SHA-256 (see :func:`write_safetensors`)
HEADER_CHECKSUM_KEY = "header_checksum"
_CRC_PLACEHOLDER = "crc32:" + "0" * 8
_HEADER_PLACEHOLDER = "sha256:" + "0" * 64
_MAX_HEADER = 100_000_000  # safetensors' own limit


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


def _encode_header(header: Mapping[str, object]) -> bytes:
    """The header as written: 8-byte little-endian length, then JSON padded to 8 bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def _seal(header: dict[str, Any]) -> bytes:
    """The encoded header with :data:`HEADER_CHECKSUM_KEY` set to the SHA-256 of the encoded
    header that holds the placeholder instead (same length)."""
    meta = header["__metadata__"]
    meta[HEADER_CHECKSUM_KEY] = _HEADER_PLACEHOLDER
    open_ = _encode_header(header)
    meta[HEADER_CHECKSUM_KEY] = "sha256:" + hashlib.sha256(open_).hexdigest()
    sealed = _encode_header(header)
    if len(sealed) != len(open_):
        raise RuntimeError("write_safetensors: the sealed header changed length")
    return sealed


def _layout(items: list[tuple[str, Tensor, torch.dtype]],
            meta: dict[str, str]) -> dict[str, Any]:
    header: dict[str, Any] = {"__metadata__": meta}
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
    return header


def _write_tensor(f: BinaryIO, name: str, t: Tensor, dtype: torch.dtype, path: Path) -> str:
    """Write one tensor's bytes, cast to ``dtype``; returns their checksum."""
    if t.numel() == 0:
        return f"crc32:{zlib.crc32(b''):08x}"
    data = t.detach().to(device="cpu", dtype=dtype).contiguous()
    if dtype != t.dtype and data.is_floating_point() and not bool(torch.isfinite(data).all()):
        warnings.warn(
            f"emakit: tensor {name!r} holds values that are not finite in {dtype} "
            f"(overflow from {t.dtype}?) in {path.name}; store a wider dtype",
            RuntimeWarning,
            stacklevel=4,
        )
    raw = _bytes_of(data)
    f.write(raw)
    return f"crc32:{zlib.crc32(raw):08x}"


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
    ``"checksums"`` (JSON, name -> checksum), computed from the bytes as they are written,
    and seal the header: :data:`HEADER_CHECKSUM_KEY` holds ``"sha256:<hex>"`` of the length
    and header bytes as written with ``"sha256:"`` and 64 zeros in its place.
    :func:`read_header` verifies it.
    """
    if sys.byteorder != "little":  # safetensors is little-endian
        raise RuntimeError("write_safetensors: only little-endian hosts are supported")
    path = Path(path)
    raw = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    items = [(it[0], it[1], it[2] if len(it) > 2 else it[1].dtype) for it in raw]
    meta = {str(k): str(v) for k, v in metadata.items() if k != HEADER_CHECKSUM_KEY}
    if checksums:  # placeholders of the final length, filled in once the data is written
        meta[CHECKSUMS_KEY] = dumps({name: _CRC_PLACEHOLDER for name, _, _ in items})
        meta[HEADER_CHECKSUM_KEY] = _HEADER_PLACEHOLDER
    header = _layout(items, meta)
    blob = _encode_header(header)
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(blob)
        crcs = {name: _write_tensor(f, name, t, dtype, path) for name, t, dtype in items}
        if checksums:  # same length as the placeholders: rewrite the header in place
            meta[CHECKSUMS_KEY] = dumps(crcs)
            final = _seal(header)
            if len(final) != len(blob):
                raise RuntimeError("write_safetensors: checksum header changed length")
            f.seek(0)
            f.write(final)
    return path


def _open_error(path: Path, err: Exception, what: str) -> ValueError:
    return ValueError(
        f"{what}: {path} is not a complete safetensors file (truncated, or another format): "
        f"{err}"
    )


def _raw_header(path: Path, what: str) -> bytes:
    """The length and header bytes of a safetensors file, as stored."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise _open_error(path, ValueError(f"header length {n} in a file of {size} bytes"),
                              what)
        return prefix + f.read(n)


def verify_header(path: str | os.PathLike, what: str = "file") -> bool:
    """Check a sealed header (see :func:`write_safetensors`); False when the file holds no
    :data:`HEADER_CHECKSUM_KEY`, True when it matches, a ValueError naming the file when not."""
    path = Path(path)
    raw = _raw_header(path, what)
    try:
        meta = json.loads(raw[8:]).get("__metadata__") or {}  # plain files may have none
        got = meta.get(HEADER_CHECKSUM_KEY) if isinstance(meta, dict) else None
    except (ValueError, AttributeError) as err:
        raise _open_error(path, err, what) from None
    if got is None:
        return False
    key = json.dumps(HEADER_CHECKSUM_KEY).encode() + b":"
    needle = key + json.dumps(got).encode()
    if not isinstance(got, str) or raw.count(needle) != 1:
        raise ValueError(f"{what}: {path}: its header checksum is malformed")
    opened = raw.replace(needle, key + json.dumps(_HEADER_PLACEHOLDER).encode())
    if "sha256:" + hashlib.sha256(opened).hexdigest() != got:
        raise ValueError(f"{what}: {path}: its header is corrupted (its bytes do not match "
                         f"the header checksum {got[:19]}...)")
    return True


def read_header(
    path: str | os.PathLike, what: str = "file"
) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The ``__metadata__`` of a safetensors file and, per tensor, its dtype code and shape,
    without reading any tensor data. A sealed header (:data:`HEADER_CHECKSUM_KEY` present) is
    verified first. A truncated, foreign or corrupted file raises a ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    verify_header(path, what)
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
    tensor data (a sealed header is verified). A truncated, foreign or corrupted file raises a
    ValueError naming it."""
    meta, tensors = read_header(path, what)
    return meta, list(tensors)


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
