"""The ``emakit`` command line: ``demo``, ``halflife``, ``synthesize``, ``inspect``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn


def _halflife(args: argparse.Namespace) -> int:
    from .schedules import (
        gamma_to_sigma_rel,
        half_life_from_smoothing,
        sigma_rel_to_gamma,
        smoothing_from_half_life,
    )

    names = ("half_life", "smoothing", "sigma_rel", "gamma")
    given = [a for a in names if getattr(args, a) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --half-life, --smoothing, --sigma-rel, --gamma"
                         + (f" (got {len(given)})" if given else ""))
    interval = args.interval
    if args.half_life is not None:
        s = smoothing_from_half_life(args.half_life, interval)
        print(f"half-life {args.half_life:g} with an update every {interval:g}: smoothing {s!r}")
    elif args.smoothing is not None:
        h = half_life_from_smoothing(args.smoothing, interval)
        print(f"smoothing {args.smoothing!r} with an update every {interval:g}: half-life {h:g}")
    elif args.sigma_rel is not None:
        print(f"sigma_rel {args.sigma_rel:g}: gamma {sigma_rel_to_gamma(args.sigma_rel):.6g}")
    else:
        print(f"gamma {args.gamma:g}: sigma_rel {gamma_to_sigma_rel(args.gamma):.6g}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


class _Progress:
    """tqdm when installed, else a plain counter on stderr."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.bar = None
        self.enabled = enabled
        self.desc = desc
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm

    def __call__(self, done: int, total: int) -> None:
        if self.enabled and self.bar is None and self._tqdm is not None:
            self.bar = self._tqdm(total=total, desc=self.desc, unit="file", leave=False)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.enabled:
            end = "\n" if done == total else ""
            print(f"\r{self.desc}: {done}/{total} files", end=end, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _out_path(args: argparse.Namespace) -> Path:
    """``--out``, checked before any work: a .safetensors name (a folder name with
    ``--pretrained``), writable, and new unless ``--force``."""
    out = Path(args.out)
    if args.pretrained is not None:
        _weights_of(Path(args.pretrained))  # a from_pretrained folder, checked now
        if out.exists() and not (args.force and out.is_dir()):
            raise ValueError(f"--out: {args.out!r} exists; pass --force to replace the folder")
        return out
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: expected a .safetensors file name, got {args.out!r}")
    if out.is_dir():
        raise ValueError(f"--out: {args.out!r} is a folder; expected a file name")
    if out.exists() and not args.force:
        raise ValueError(f"--out: {args.out!r} exists; pass --force to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot write into {str(parent)!r} (permission denied)")
    return out


def _out_dtype(text: str | None) -> Any:
    from .io import dtype_from_name

    if not text:
        return None
    dtype = dtype_from_name(text, "--dtype")
    if not dtype.is_floating_point:
        raise ValueError(f"--dtype: expected a floating dtype (float32, bfloat16, ...), "
                         f"got {text!r}: an average is not a whole number")
    return dtype


def _synthesize(args: argparse.Namespace) -> int:
    from .io import dumps, write_safetensors
    from .posthoc import plan_synthesis, synthesize

    out = _out_path(args)
    dtype = _out_dtype(args.dtype)
    max_error = None if args.max_error == 0 else args.max_error
    plan = plan_synthesis(args.dir, [args.sigma_rel], at=args.at, max_error=max_error)
    bar = _Progress(not args.no_progress, "synthesizing")
    try:
        state = synthesize(plan, dtype=dtype, progress=bar)[0]
    finally:
        bar.close()
    last = plan.snapshots[-1]
    error = float(plan.errors[0])
    metadata = {
        "format": "emakit.posthoc-synthesized",
        "sigma_rel": repr(float(args.sigma_rel)),
        "step": str(last.step),
        "t": repr(last.t),
        "snapshots": str(len(plan.snapshots)),
        "profile_error": repr(error),
        "fingerprint": last.fingerprint,
        "source": dumps([s.path.name for s in plan.snapshots]),
    }
    try:
        if args.pretrained is not None:
            _write_pretrained(state, Path(args.pretrained), out, dtype, metadata)
        else:
            write_safetensors(out, state, metadata, overwrite=args.force, checksums=True)
    except OSError as err:
        raise ValueError(f"--out: cannot write {args.out!r} ({err.strerror or err})") from None
    print(f"sigma_rel {args.sigma_rel:g} at step {last.step} from {len(plan.snapshots)} "
          f"snapshots (profile error {error:.2e}) -> {out}")
    return 0


def _weights_of(folder: Path) -> tuple[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """The weights file name a ``from_pretrained`` folder uses (``model.safetensors``,
    ``diffusion_pytorch_model.safetensors``; for shards, the name their index stands for)
    and, per tensor, its dtype code and shape; a ValueError naming ``--pretrained``
    otherwise."""
    import json

    from .io import read_header

    if not (folder / "config.json").is_file():
        raise ValueError(f"--pretrained: {str(folder)!r} holds no config.json; expected a "
                         "folder written by save_pretrained")
    index = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted(folder.glob("*.safetensors")) if not index else sorted(
        {folder / f for f in json.loads(index[0].read_text())["weight_map"].values()})
    if len(files) != 1 and not index:
        raise ValueError(f"--pretrained: {str(folder)!r} holds {len(files)} .safetensors "
                         "files and no index; expected one weights file")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for f in files:
        tensors.update(read_header(f, what="--pretrained")[1])
    return (index[0].name[: -len(".index.json")] if index else files[0].name), tensors


def _write_pretrained(state: dict, like: Path, out: Path, dtype: Any,
                      metadata: dict[str, str]) -> None:
    """``out``: ``like``'s files (config, tokenizer, ...) and one weights file of its name
    holding ``state`` under the names of ``like``'s weights, each in their dtype (or
    ``dtype``), so that the model's ``from_pretrained(out)`` loads it. Written beside ``out``
    and renamed into place."""
    import shutil
    import tempfile

    from .io import DTYPE_CODES, write_safetensors

    name, tensors = _weights_of(like)
    missing = sorted(set(tensors) - set(state))
    written = {id(state[k]) for k in tensors if k in state}
    extra = sorted(k for k in state if k not in tensors and id(state[k]) not in written)
    if missing or extra:
        raise ValueError(f"--pretrained: the snapshots' model and {str(like)!r} differ "
                         f"(missing {missing[:5]}, unexpected {extra[:5]})")
    codes = {code: d for d, code in DTYPE_CODES.items()}
    items = [(k, state[k].contiguous(),
              dtype if dtype is not None and state[k].is_floating_point()
              else codes.get(code, state[k].dtype)) for k, (code, _) in tensors.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for f in like.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".index.json", ".bin")):
                shutil.copy2(f, tmp / f.name)
        write_safetensors(tmp / name, items, {"format": "pt", **metadata})
        old = out.parent / f".{out.name}.old-{tmp.name}" if out.exists() else None
        if old is not None:
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _inspect(args: argparse.Namespace) -> int:
    from .checkpoint import POINTER

    path = Path(args.path)
    if not args.max_error > 0:
        raise ValueError(f"--max-error: expected a number > 0, got {args.max_error:g}")
    if path.is_dir():
        if (path / POINTER).is_file() or (path / ".metadata").is_file():
            return _inspect_checkpoint(path, args.limit)
        return _inspect_folder(path, args.max_error)
    if not path.is_file():
        raise ValueError(f"path: {args.path!r} is neither a file nor a folder")
    if path.suffix == ".safetensors":
        return _inspect_safetensors(path, args.limit)
    return _inspect_torch(path, args.limit)


def _inspect_safetensors(path: Path, limit: int) -> int:
    """A safetensors file: its metadata and tensors (a sealed header is verified)."""
    from .io import CHECKSUMS_KEY, HEADER_CHECKSUM_KEY, read_header

    meta, tensors = read_header(path, what="path")
    print(f"{path}: safetensors, {len(tensors)} tensors")
    for k, v in sorted(meta.items()):
        print(f"  {k}: {v if len(v) <= 100 else v[:97] + '...'}")
    for k, (dtype, shape) in list(tensors.items())[:limit]:
        print(f"  {k}: {dtype} {list(shape)}")
    if len(tensors) > limit:
        print(f"  ... {len(tensors) - limit} more")
    if HEADER_CHECKSUM_KEY in meta:
        sums = "tensor checksums checked when read" if CHECKSUMS_KEY in meta else "no tensor sums"
        print(f"  checksums: header verified; {sums}")
    return 0


def _inspect_torch(path: Path, limit: int) -> int:
    """A torch file, read with ``weights_only=True`` (no code runs): its tree of values."""
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # names a class or function to call
            raise ValueError(f"path: {str(path)!r} holds objects that are not plain data; "
                             "refused (unpickling them could run code)") from None
        raise ValueError(f"path: {str(path)!r} is not a complete torch checkpoint (truncated, "
                         "or another format)") from None
    except Exception as err:  # zip or pickle framing: truncated, or another format
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"path: {str(path)!r} is not a complete torch checkpoint "
                         f"(truncated, or another format: {line})") from None
    print(f"{path}: torch file, {type(state).__name__}")
    _walk(state, "", 0, limit)
    return 0


def _walk(obj: Any, prefix: str, depth: int, limit: int) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        name = prefix.rstrip(".")
        print(f"  {name}: {str(obj.dtype).removeprefix('torch.')} {list(obj.shape)}")
    elif isinstance(obj, dict) and depth < 3:
        for i, (k, v) in enumerate(obj.items()):
            if i >= limit:
                print(f"  {prefix}... {len(obj) - limit} more")
                break
            _walk(v, f"{prefix}{k}.", depth + 1, limit)
    else:
        text = repr(obj)
        print(f"  {prefix.rstrip('.')}: {text if len(text) <= 80 else text[:77] + '...'}")


def _inspect_folder(path: Path, max_error: float) -> int:
    from .io import is_temporary
    from .posthoc import format_intervals, list_snapshots, supported_sigma_rels
    from .posthoc.snapshots import scan

    snaps = list_snapshots(path)
    every = len(scan(path))
    temporary = [p for p in path.iterdir() if is_temporary(p)]
    last = snaps[-1]
    profiles = ", ".join(f"{s:g} (gamma {g:.4g})" for s, g in zip(last.sigma_rels, last.gammas,
                                                                   strict=True))
    print(f"{path}: {len(snaps)} post-hoc EMA snapshots, steps {snaps[0].step} to {last.step}")
    print(f"  profiles: sigma_rel {profiles}; stored as {last.dtype}")
    print(f"  model fingerprint {last.fingerprint}, run {last.run_id[:12]}, "
          f"emakit {last.emakit_version}, time unit {last.time_unit}")
    if every > len(snaps):
        print(f"  {every - len(snaps)} snapshots superseded by a resumed run (left out)")
    if temporary:
        print(f"  {len(temporary)} temporary files from interrupted writes (ignored; "
              "removed by the next write)")
    shown: list[Any] = [*snaps] if len(snaps) <= 12 else [*snaps[:5], None, *snaps[-5:]]
    print("  | step | t | samples | file | MB |")
    for s in shown:
        if s is None:
            print(f"  | ... {len(snaps) - 10} more |")
            continue
        size = s.path.stat().st_size / 2**20
        print(f"  | {s.step} | {s.t:g} | {s.samples} | {s.path.name} | {size:.1f} |")
    ranges = supported_sigma_rels(snaps, max_error)
    if not ranges:
        print(f"  no sigma_rel is reproduced within profile error {max_error:g}")
    else:
        print(f"  supported sigma_rel at step {last.step} (profile error <= {max_error:g}): "
              f"{format_intervals(ranges)}")
    return 0


def _inspect_checkpoint(path: Path, limit: int) -> int:
    """A folder written by ``emakit.checkpoint.save``: its entries, read without unpickling
    code, its pointer and metadata checked against their checksums."""
    from .checkpoint import read_checkpoint

    info, md = read_checkpoint(path)
    entries = sorted(md.state_dict_metadata.items())
    files = sorted({s.relative_path for s in md.storage_data.values()})
    print(f"{path}: distributed checkpoint, {len(entries)} entries in {len(files)} files")
    if info.manifest is None:
        print("  written by emakit 0.1: no checksums")
    else:
        print(f"  data in {info.data.name}; checksums: pointer and metadata verified, "
              "data files verified when loaded")
    for name, value in entries[:limit]:
        size = getattr(value, "size", None)
        if size is None:
            print(f"  {name}: value")
        else:
            dtype = str(value.properties.dtype).removeprefix("torch.")
            print(f"  {name}: {dtype} {list(size)} in {len(value.chunks)} shards")
    if len(entries) > limit:
        print(f"  ... {len(entries) - limit} more")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(
        prog="emakit", description="Exponential moving averages of PyTorch model weights."
    )
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="train a small model on digits, raw vs EMA weights")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("halflife", help="convert half-life, smoothing and sigma_rel")
    p.add_argument("--half-life", type=_finite, help="half-life, in units of training time")
    p.add_argument("--smoothing", type=_finite, help="per-update smoothing in [0, 1]")
    p.add_argument("--sigma-rel", type=_finite, help="power-function EMA relative width")
    p.add_argument("--gamma", type=_finite, help="power-function EMA exponent")
    p.add_argument("--interval", type=_finite, default=1.0, help="time between updates")
    p.set_defaults(func=_halflife)

    from .posthoc.synthesis import DEFAULT_MAX_ERROR

    p = sub.add_parser("synthesize", help="post-hoc EMA of any sigma_rel from a snapshot folder")
    p.add_argument("dir", help="the snapshot_dir of a PostHocEMA")
    p.add_argument("--sigma-rel", type=_finite, required=True, help="target relative width")
    p.add_argument("--at", type=_at_least(1), default=None,
                   help="step of the snapshot to synthesize at (default: the last)")
    p.add_argument("--out", required=True, help="output .safetensors file (a model state "
                   "dict), or with --pretrained a from_pretrained folder")
    p.add_argument("--pretrained", default=None, metavar="MODEL_DIR",
                   help="a save_pretrained folder of the model (e.g. checkpoint-N/ema): --out "
                   "gets its config and other files, and the weights in its format")
    p.add_argument("--max-error", type=_max_error(allow_zero=True), default=DEFAULT_MAX_ERROR,
                   help="largest relative profile error accepted (0: any)")
    p.add_argument("--dtype", default=None, help="output dtype, e.g. float32 (default: the "
                   "model's)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_synthesize)

    p = sub.add_parser("inspect", help="what a snapshot folder, safetensors or torch file holds")
    p.add_argument("path", help="a snapshot folder, a .safetensors file or a torch checkpoint")
    p.add_argument("--max-error", type=_max_error(allow_zero=False), default=DEFAULT_MAX_ERROR,
                   help="profile error defining the supported sigma_rel range")
    p.add_argument("--limit", type=_at_least(1), default=20, help="tensors listed at most")
    p.set_defaults(func=_inspect)
    return parser


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _max_error(allow_zero: bool):
    def parse(text: str) -> float:
        value = _finite(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(
                f"expected a number {'>= 0 (0: any)' if allow_zero else '> 0'}, got {text!r}")
        return value

    return parse


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    return parse


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 2 for any error, reported as one
    line on stderr naming the argument or file)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:
        if isinstance(err, OSError) and err.filename is not None:
            msg = f"{err.filename}: {err.strerror or err}"
        else:
            msg = _one_line(err)
        print(f"emakit {args.command}: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"emakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("EMAKIT_TRACEBACK"):
            raise
        print(f"emakit {args.command}: internal error, please report it: "
              f"{type(err).__name__}: {_one_line(err)} (EMAKIT_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
