"""Runs the server process: uvicorn, with SIGTERM draining instead of dropping requests."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from lmserve.engine.config import EngineConfig
from lmserve.engine.loader import ModelLoadError, read_json, resolve_model_dir
from lmserve.engine.models import model_class
from lmserve.engine.tokenizer import Tokenizer
from lmserve.server.app import create_app
from lmserve.server.logs import configure_logging
from lmserve.server.settings import ServerOptions
from lmserve.server.state import Phase, ServerState

logger = logging.getLogger("lmserve.server")


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (ready turns 503, new requests get 503, in-flight ones finish
    or are cut at drain_seconds), then the server exits 0. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[no-untyped-def]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_task is not None or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await self.state.drain()
        self.should_exit = True


def preflight(engine_config: EngineConfig) -> None:
    """Fails fast, before listening, on a model that cannot be found or is not supported."""
    model_dir = resolve_model_dir(engine_config.model.model, engine_config.model.revision)
    try:
        model_class(read_json(model_dir / "config.json"))
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    tokenizer_dir = engine_config.model.tokenizer or model_dir
    if not Tokenizer.exists(tokenizer_dir):
        raise ModelLoadError(f"no tokenizer (tokenizer.json or tokenizer.model) in {tokenizer_dir}; pass --tokenizer")


def run_server(options: ServerOptions, engine_config: EngineConfig) -> int:
    configure_logging(options.log_level)
    preflight(engine_config)
    state = ServerState.create(options, engine_config)
    app = create_app(state)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        ssl_certfile=options.tls_certfile,
        ssl_keyfile=options.tls_keyfile,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = DrainingServer(config, state)
    state.on_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    return 1 if state.phase is Phase.FAILED else 0
