"""`lmserve serve MODEL [--flags]`: flags generated from the settings model, one place."""

from __future__ import annotations

import argparse
import sys

from lmserve.server.settings import ServeSettings, split_settings
from lmserve.settings import SettingsParser, add_arguments, load_settings


def build_parser() -> SettingsParser:
    parser = SettingsParser(
        prog="lmserve serve",
        description="Serve one model over an OpenAI-compatible HTTP API. "
        "Every flag can also be set as LMSERVE_<NAME> in the environment or in a --config YAML file "
        "(precedence: flags > environment > file > defaults).",
    )
    parser.add_argument("model", nargs="?", default=argparse.SUPPRESS,
                        help="model directory, Hugging Face Hub id, or 'demo' for the built-in demo model")
    parser.add_argument("--config", default=None, help="YAML file of settings (same names as the flags)")
    add_arguments(parser, ServeSettings, skip=("model",))
    return parser


def serve_main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        settings = load_settings(ServeSettings, args, config_file)
        options, engine_config = split_settings(settings)
    except ValueError as exc:
        message = str(exc)
        if "setting model:" in message:
            message = "a model is required: lmserve serve MODEL (a directory, a Hub id, or 'demo')"
        print(f"lmserve serve: error: {message}", file=sys.stderr)
        return 2
    from lmserve.engine.loader import ModelLoadError
    from lmserve.server.main import run_server

    try:
        return run_server(options, engine_config)
    except ModelLoadError as exc:
        print(f"lmserve serve: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        print(f"lmserve serve: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))

