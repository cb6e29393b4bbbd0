"""The ``emakit`` command line: ``demo``, ``halflife``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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
        raise SystemExit("emakit halflife: give exactly one of --half-life, --smoothing, "
                         "--sigma-rel, --gamma")
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="emakit", description="Exponential moving averages of PyTorch model weights."
    )
    parser.add_argument("--version", action="version", version=f"emakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small model on digits, raw vs EMA weights")
    from .demo import add_arguments

    add_arguments(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser("halflife", help="convert half-life, smoothing and sigma_rel")
    p.add_argument("--half-life", type=float, help="half-life, in units of training time")
    p.add_argument("--smoothing", type=float, help="per-update smoothing in [0, 1]")
    p.add_argument("--sigma-rel", type=float, help="power-function EMA relative width")
    p.add_argument("--gamma", type=float, help="power-function EMA exponent")
    p.add_argument("--interval", type=float, default=1.0, help="time between updates")
    p.set_defaults(func=_halflife)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"emakit {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
