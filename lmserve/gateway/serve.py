"""Runs the gateway on uvicorn (uvloop, the HTTP/1.1 protocol of http11.py) with graceful drain on SIGTERM/SIGINT.

On the first signal `/ready` turns 503, uvicorn stops accepting connections, closes idle
keep-alive connections, and waits up to `drain_seconds` for in-flight requests (streams included)
to finish; then the ledger is flushed and the process exits.
"""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from lmserve.gateway.app import Gateway, create_app
from lmserve.gateway.config import GatewayConfig
from lmserve.gateway.http11 import HTTP11Protocol
from lmserve.gateway.logs import setup_logging
from lmserve.heap import freeze_heap

log = logging.getLogger("lmserve.gateway")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def startup(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        await super().startup(sockets)  # exits the process if the lifespan or the bind fails
        freeze_heap("gateway")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first signal drains, a second one exits at once; either way the process then exits 0
        like the server (uvicorn's own handler re-raises the signal after shutdown: -SIGTERM)."""
        if self.gateway.is_draining:
            self.force_exit = True
            return
        log.info("signal %d: draining in-flight requests, then exiting", sig)
        self.gateway.is_draining = True
        self.should_exit = True


def uvicorn_config(config: GatewayConfig, gateway: Gateway) -> uvicorn.Config:
    """uvicorn's settings for `gateway`: our HTTP/1.1 protocol with the client body timeout, and the
    drain time as given (a fraction of a second included)."""
    return uvicorn.Config(
        gateway, host=config.host, port=config.port, loop="uvloop",
        http=HTTP11Protocol.with_body_timeout(config.timeouts.client_body), lifespan="on",
        access_log=False, log_config=None, log_level=config.log_level, backlog=4096,
        ssl_certfile=config.tls_certfile, ssl_keyfile=config.tls_keyfile,
        # uvicorn annotates this as int, but only hands it to asyncio.timeout(), which takes a float:
        # int() made `drain_seconds: 0.5` cut every in-flight request at once.
        timeout_graceful_shutdown=config.drain_seconds,  # type: ignore[arg-type]
        timeout_keep_alive=30, proxy_headers=False, server_header=False, date_header=False,
    )


def run_gateway(config: GatewayConfig, gateway: Gateway | None = None) -> None:
    """Serves `gateway` (by default `create_app(config)`) until a signal drains it."""
    setup_logging(config.log_level)
    gateway = gateway or create_app(config)
    server = _DrainingServer(uvicorn_config(config, gateway), gateway)
    log.info("lmserve gateway listening on %s://%s:%d with %d model(s)",
             "https" if config.tls_certfile else "http", config.host, config.port, len(config.models))
    server.run()
