"""The one entry point: `lmserve <command>`. Each command is a thin call into a package."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="lmserve",
    help="Serve open large language models: engine, OpenAI-compatible server, gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Gateway (issue 5): heavy imports stay inside the commands.
from lmserve.gateway.cli import gateway_command, keys_app

app.command("gateway")(gateway_command)
app.add_typer(keys_app, name="keys")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
