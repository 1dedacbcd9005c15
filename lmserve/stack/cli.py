"""`lmserve up [flags]`: flags generated from the stack's settings, read through the shared layer."""

from __future__ import annotations

import sys

from lmserve.settings import SettingsParser, config_file_parser, dataclass_flags
from lmserve.stack.config import StackConfig, load_stack_config


def build_up_parser() -> SettingsParser:
    return config_file_parser(
        "lmserve up",
        "Start a gateway in front of model servers on this machine; Ctrl-C stops them all. "
        "Every flag can also be set as LMSERVE_<NAME> in the environment or in a --config stack YAML file "
        "(precedence: flags > environment > file > defaults).",
        "Stack YAML (default: the built-in demo stack).", dataclass_flags(StackConfig, skip=("models", "gateway")))


def up_main(argv: list[str]) -> int:
    """A bad setting is one line on stderr and exit status 2; a part that fails to start, status 1."""
    from lmserve.stack.up import run_up

    args = vars(build_up_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        stack = load_stack_config(config_file, args)
    except ValueError as exc:
        print(f"lmserve up: error: {exc}", file=sys.stderr)
        return 2
    return run_up(stack, say=lambda line: print(line, flush=True))
