"""Command line: `python -m server serve [--flags]`, `python -m server worker`.

Every setting has a flag named after it (`--checkpoint`, `--host`, `--port`, `--mode`,
`--api-key`, `--queue-size`, ...); a flag wins over the environment variable of the same name.
"""
from __future__ import annotations

import argparse
import logging
import sys

from server.settings import Settings


def settings_parser(prog: str = "python -m server serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the job API, /v1/tts and realtime calls.")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (field.description or "") + f" (env {name.upper()}; default {field.default!r})"
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: value for name, value in vars(args).items()
                 if name in Settings.model_fields and value is not None}
    return Settings(**overrides)


def serve(argv: list[str]) -> int:
    from aiohttp import web
    from pydantic import ValidationError

    from server.app import create_app
    from signaling.server_tools import ToolsFileError

    args = settings_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        app = create_app(settings)
    except ToolsFileError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=settings.host, port=settings.port,
                print=lambda _msg: print(f"serving on http://{settings.host}:{settings.port} "
                                         f"(mode {settings.mode}, checkpoint {settings.checkpoint})", flush=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m server serve [--flags]   (see python -m server serve --help)\n"
              "       python -m server worker [runpod flags, e.g. --test_input JSON]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "worker":
        from server import worker

        sys.argv = [sys.argv[0], *rest]
        worker.main()
        return 0
    print(f"unknown command {command!r}; use serve or worker", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
