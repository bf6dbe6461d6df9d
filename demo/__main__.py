"""Run the demo: ``python -m demo --out demo-out`` (``make demo``)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.markup import escape

from demo._common import (
    AWS_KMS,
    PKCS11,
    StepFailed,
    prepare_out_dir,
)
from demo._walk import Demo


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="Walk the Signery lifecycle against a real server on 127.0.0.1 "
        "and leave the signed files, keys, chain and audit events in OUT.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="output directory, wiped and recreated (default: demo-out)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary data directory (database, master key, profiles)",
    )
    parser.add_argument(
        "--no-hardware",
        action="store_true",
        help="skip the pkcs11 (SoftHSM2) and aws-kms (moto) key stores even where available",
    )
    # Makes a step fail on purpose, to check that the demo then exits 1.
    parser.add_argument("--debug-break", choices=["sign-key", "signature"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 if every step succeeded, 1 if one failed."""
    args = parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=110)  # a log file has room for wide tables
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)  # so that `finally` stops the server
    try:
        prepare_out_dir(args.out)
    except (StepFailed, OSError) as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="signery-demo-")).resolve()
    demo = Demo(console, args.out, tmp, args.debug_break, hardware=not args.no_hardware)
    console.rule("[bold]Signery demo", align="left")
    extra = {
        PKCS11: "the pkcs11 key store on a SoftHSM2 token",
        AWS_KMS: "the aws-kms key store on moto's AWS KMS double",
    }
    also = " and ".join(extra[store] for store in demo.hardware)
    console.print(
        "  A real `signery serve` on 127.0.0.1 with a temporary data directory "
        "(SQLite, builtin key store, built-in CA"
        + (f"; also {also}" if also else "")
        + "), driven with the `signery` CLI and checked with openssl.",
        highlight=False,
    )
    ok = False
    try:
        ok = demo.walk()
    except KeyboardInterrupt:
        console.print("\n[bold red]interrupted[/]")
        return 130
    finally:
        status = demo.stop_server()
        if status is not None:
            console.print(f"  server stopped (exit status {status})")
        status = demo.stop_moto()
        if status is not None:
            console.print(f"  AWS KMS double stopped (exit status {status})")
        demo.collect_log()
        if args.keep:
            console.print(f"  kept the temporary directory {escape(str(tmp))}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    demo.summary(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
