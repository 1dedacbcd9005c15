"""`lmserve gateway` and `lmserve keys ...`: thin typer commands over the gateway package."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from lmserve.settings import SettingsParser

keys_app = typer.Typer(help="Create, list and revoke gateway API keys; show their usage.", no_args_is_help=True)

_DB_HELP = ("SQLAlchemy database URL (default: the gateway config's; without -c, that of the stack `lmserve up` "
            "runs, $LMSERVE_HOME/gateway.yaml; else sqlite:///lmserve-gateway.db).")


def build_gateway_parser() -> SettingsParser:
    """Flags generated from GatewayConfig's top-level settings (sections are set in the file or as
    LMSERVE_<SECTION>__<KEY>), the same names as `lmserve serve` has for the same settings."""
    from lmserve.gateway.config import GatewayConfig
    from lmserve.settings import config_file_parser, dataclass_flags

    return config_file_parser(
        "lmserve gateway",
        "Run the gateway in front of OpenAI-compatible backends. Every setting can also be set as "
        "LMSERVE_<NAME> (LMSERVE_<SECTION>__<NAME> inside a section) in the environment or in a --config YAML "
        "file (precedence: flags > environment > file > defaults).",
        "Gateway YAML file.", dataclass_flags(GatewayConfig, skip=("models",)))


def gateway_main(argv: list[str]) -> int:
    """`lmserve gateway [flags]`: a bad setting is one line on stderr and exit status 2."""
    from lmserve.gateway.config import load_config
    from lmserve.gateway.serve import run_gateway

    args = vars(build_gateway_parser().parse_args(argv))
    config_file = args.pop("config")
    try:
        cfg = load_config(config_file, overrides=args)
    except ValueError as exc:
        print(f"lmserve gateway: error: {exc}", file=sys.stderr)
        return 2
    run_gateway(cfg)
    return 0


def _store(database_url: str | None, config: str | None):  # type: ignore[no-untyped-def]
    from lmserve.gateway.config import load_config
    from lmserve.gateway.keystore import KeyStore

    if database_url is None:
        database_url = load_config(config or _stack_config()).database_url
    return KeyStore(database_url)


def _stack_config() -> str | None:
    """The gateway config `lmserve up` wrote, when there is one: `lmserve keys` then manages the
    running stack's keys without -c."""
    from lmserve.settings import lmserve_home

    path = lmserve_home() / "gateway.yaml"
    return str(path) if path.is_file() else None


def _parse_expiry(value: str | None) -> dt.datetime | None:
    """`30d`, `12h`, `45m` from now, or an ISO 8601 date/time (UTC when no zone is given)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)([dhm])", value.strip())
    if match:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        return dt.datetime.now(dt.timezone.utc) + dt.timedelta(**{unit: int(match.group(1))})
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"--expires: use 30d / 12h / 45m or an ISO date, got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@keys_app.command("create")
def create(
    name: str = typer.Option(..., help="Who the key is for."),
    models: str | None = typer.Option(None, help="Comma-separated models the key may use (default: all)."),
    rpm: int | None = typer.Option(None, help="Requests per minute."),
    tpm: int | None = typer.Option(None, help="Tokens per minute."),
    budget_tokens: int | None = typer.Option(None, help="Lifetime token budget."),
    tenant: str | None = typer.Option(None, help="Tenant the key belongs to."),
    priority: str = typer.Option("normal", help="high, normal or low (load shedding order)."),
    expires: str | None = typer.Option(None, help="30d, 12h, 45m, or an ISO date."),
    database_url: str | None = typer.Option(None, help=_DB_HELP),
    config: str | None = typer.Option(None, "--config", "-c", help="Gateway YAML (for its database URL)."),
) -> None:
    """Create a key. The key is printed once; only its hash is stored."""
    store = _store(database_url, config)
    try:
        plaintext, record = store.create_key(name, models.split(",") if models else None, rpm, tpm,
                                             budget_tokens, tenant, priority, _parse_expiry(expires))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(json.dumps({"key": plaintext, **record.as_dict()}, indent=2))
    typer.echo("Store this key now: it cannot be shown again.", err=True)


@keys_app.command("list")
def list_keys(database_url: str | None = typer.Option(None, help=_DB_HELP),
              config: str | None = typer.Option(None, "--config", "-c")) -> None:
    """List keys (ids, prefixes, limits; never the keys themselves)."""
    typer.echo(json.dumps([k.as_dict() for k in _store(database_url, config).list_keys()], indent=2))


@keys_app.command("revoke")
def revoke(key_id: str = typer.Argument(..., help="Key id or shown prefix."),
           database_url: str | None = typer.Option(None, help=_DB_HELP),
           config: str | None = typer.Option(None, "--config", "-c")) -> None:
    """Revoke a key (gateways stop accepting it within their key cache TTL, 5 s by default)."""
    if not _store(database_url, config).revoke(key_id):
        typer.echo(f"no live key {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@keys_app.command("usage")
def usage(key_id: str | None = typer.Argument(None, help="Only this key."),
          database_url: str | None = typer.Option(None, help=_DB_HELP),
          config: str | None = typer.Option(None, "--config", "-c")) -> None:
    """Token and request totals per key and model, from the usage ledger."""
    typer.echo(json.dumps(_store(database_url, config).usage(key_id), indent=2))
