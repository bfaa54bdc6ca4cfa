"""The ``kvroom`` command: ``demo``, ``audit``, ``diagrams`` and ``keys``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]


def _diagrams(args: argparse.Namespace) -> int:
    from kvroom.observe.diagrams import DEFAULT_DIR, stale_diagrams, write_diagrams

    out = Path(args.out) if args.out else DEFAULT_DIR
    if args.check:
        stale = stale_diagrams(out)
        if stale:
            print(f"kvroom diagrams: stale in {out}: {', '.join(stale)}; run `kvroom diagrams` to regenerate")
            return 1
        print(f"kvroom diagrams: {out} is up to date")
        return 0
    for path in write_diagrams(out):
        print(f"wrote {path}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from kvroom.observe.replay import main as audit_main

    return audit_main(args.log, as_json=args.json)


def _keys(args: argparse.Namespace) -> int:
    from kvroom.transport.auth import generate_keys

    try:
        public, secret = generate_keys(args.dir, args.name)
    except (ValueError, OSError) as exc:
        print(f"kvroom keys: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {public} (public: give it to the peers that must accept this process)")
    print(f"wrote {secret} (secret, mode 0600: keep it here)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvroom.demo import run_demo

    return run_demo(args)


class _Parser(argparse.ArgumentParser):
    """Bad flags give one line that says what to do, and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvroom`` command."""
    parser = _Parser(prog="kvroom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("diagrams", help="write (or --check) the state diagrams generated from the FSM")
    p.add_argument("--out", help="output directory (default: the repository's diagrams/)")
    p.add_argument("--check", action="store_true", help="exit 1 when the files in --out are stale")
    p.set_defaults(func=_diagrams)

    p = sub.add_parser("audit", help="replay an audit log against the state machine declaration")
    p.add_argument("log", help="JSON-lines audit log written by kvroom")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.set_defaults(func=_audit)

    p = sub.add_parser("keys", help="generate a CURVE key pair for the authenticated control plane")
    p.add_argument("dir", help="directory to write NAME.key (public) and NAME.key_secret (0600) into")
    p.add_argument("--name", default="kvroom", help="file name of the pair (default: kvroom)")
    p.set_defaults(func=_keys)

    p = sub.add_parser("demo", help="move KV pages between real prefill and decode processes")
    from kvroom.demo.options import add_demo_arguments

    add_demo_arguments(p)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kvroom`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        print("kvroom: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
