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


def _version(value: bool) -> None:
    if value:
        from lmserve import __version__

        typer.echo(f"lmserve {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """lmserve: serve open large language models."""


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve one model over an OpenAI-compatible HTTP API (lmserve serve --help for every flag)."""
    from lmserve.server.cli import serve_main

    raise typer.Exit(serve_main(ctx.args))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
