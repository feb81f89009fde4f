"""The ``meshline`` command line: ``meshline demo [--url URL]``."""

from __future__ import annotations

import argparse
import sys

from .testing._server import NatsServerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshline", description="meshline command line")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show meshline at work on an embedded NATS server")
    demo.add_argument("--url", help="use this NATS server instead of starting one")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import demo as run_demo

        try:
            run_demo(args.url)
        except NatsServerError as exc:
            print(f"meshline: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
