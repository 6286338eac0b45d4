"""Command line: `python -m lib_mos <command>`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_mos", description="Mix-of-Show tools outside the WebUI.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job end to end on the embedded tiny model")
    demo.add_argument("--out", type=Path, default=Path("outputs"), help="folder for what the demo writes")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "demo":
        from lib_mos.demo import run_demo

        run_demo(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
