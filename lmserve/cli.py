"""The one entry point: `lmserve <command>`. Each command is a thin call into a package."""

from __future__ import annotations

import typer

from lmserve.bench.cli import bench_command
from lmserve.gateway.cli import gateway_command, keys_app

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


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Serve one model over an OpenAI-compatible HTTP API (lmserve serve --help for every flag)."""
    from lmserve.server.cli import serve_main

    raise typer.Exit(serve_main(ctx.args))


@app.command("up")
def up(
    config: str | None = typer.Option(None, "--config", "-c", help="Stack YAML (default: the built-in demo stack)."),
    port: int | None = typer.Option(None, help="Gateway port (default 8000)."),
    home: str | None = typer.Option(None, help="Keys, logs and generated configs (default $LMSERVE_HOME or ~/.lmserve)."),
    redis: str | None = typer.Option(None, "--redis", help="Redis URL: share limits and cache."),
    database_url: str | None = typer.Option(None, help="Key store URL (default SQLite under home)."),
) -> None:
    """Start a gateway in front of model servers on this machine; Ctrl-C stops them all."""
    from lmserve.stack.config import load_stack_config
    from lmserve.stack.up import run_up

    try:
        stack = load_stack_config(config, {"port": port, "home": home, "redis_url": redis, "database_url": database_url})
    except ValueError as exc:
        typer.echo(f"lmserve up: error: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_up(stack, say=lambda line: typer.echo(line, err=False)))


app.command("gateway")(gateway_command)
app.add_typer(keys_app, name="keys")
app.command("bench")(bench_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
