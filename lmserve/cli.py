"""The one entry point: `lmserve <command>`. Each command is a thin call into a package."""

from __future__ import annotations

from typing import Any

import typer

from lmserve.batch.cli import batch_app
from lmserve.bench.cli import bench_command
from lmserve.gateway.cli import keys_app

app = typer.Typer(
    name="lmserve",
    help="Serve open large language models: engine, OpenAI-compatible server, gateway.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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


# Commands that parse their own flags (generated from their settings, lmserve/settings.py): typer
# hands them every argument as given, --help included.
_OWN_FLAGS: dict[str, Any] = {"context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
                              "add_help_option": False}


@app.command("serve", **_OWN_FLAGS)
def serve(ctx: typer.Context) -> None:
    """Serve one model over an OpenAI-compatible HTTP API (lmserve serve --help for every flag)."""
    from lmserve.server.cli import serve_main

    raise typer.Exit(serve_main(ctx.args))


@app.command("up", **_OWN_FLAGS)
def up(ctx: typer.Context) -> None:
    """Start a gateway in front of model servers on this machine; Ctrl-C stops them all (lmserve up --help)."""
    from lmserve.stack.cli import up_main

    raise typer.Exit(up_main(ctx.args))


@app.command("gateway", **_OWN_FLAGS)
def gateway(ctx: typer.Context) -> None:
    """Run the gateway in front of OpenAI-compatible backends (lmserve gateway --help for every flag)."""
    from lmserve.gateway.cli import gateway_main

    raise typer.Exit(gateway_main(ctx.args))


app.add_typer(keys_app, name="keys")
app.add_typer(batch_app, name="batch")
app.command("bench")(bench_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
