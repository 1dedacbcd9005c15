"""Everything one server process holds, created at start-up and passed to the handlers."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmserve.engine.async_engine import EngineClient, ThreadEngine
from lmserve.engine.config import EngineConfig
from lmserve.engine.loader import DEMO_MODEL_NAMES
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.tokenizer import Tokenizer
from lmserve.heap import freeze_heap
from lmserve.server.engine_process import ProcessEngine
from lmserve.server.errors import unavailable
from lmserve.server.metrics import ServerMetrics
from lmserve.server.sampling_defaults import read_sampling_defaults
from lmserve.server.settings import ServerOptions

logger = logging.getLogger("lmserve.server")

DEMO_SERVED_NAME = "lmserve-demo"


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class ServerState:
    """Invariant: `engine`, `tokenizer` and `metrics` are set exactly when phase is past LOADING."""

    options: ServerOptions
    engine_config: EngineConfig
    model_name: str
    phase: Phase = Phase.LOADING
    engine: EngineClient | None = None
    tokenizer: Tokenizer | None = None
    metrics: ServerMetrics | None = None
    max_model_len: int = 0
    load_error: str | None = None
    """Why the server failed (phase FAILED): the model did not load, or the engine died."""
    started_at: float = field(default_factory=time.time)
    num_in_flight: int = 0
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """Sampling values for requests that omit them: the model's generation_config.json (when
    options.generation_config is auto), read at load."""
    on_failure: Callable[[], None] | None = None
    """Called when the server can no longer serve: the model failed to load, or the engine died
    (the process runner then stops the server, which exits non-zero so that a supervisor restarts it)."""
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def create(cls, options: ServerOptions, engine_config: EngineConfig) -> ServerState:
        model = engine_config.model.model
        name = options.served_model_name or (DEMO_SERVED_NAME if model in DEMO_MODEL_NAMES else model)
        return cls(options=options, engine_config=engine_config, model_name=name)

    async def load(self) -> None:
        """Loads the model off the event loop, starts the engine stepping, warms up, becomes READY."""
        engine: EngineClient = (ProcessEngine(self.engine_config, self.options.log_level)
                                if self.options.engine_mode == "process" else ThreadEngine(self.engine_config))
        try:
            info = await engine.start()
            tokenizer_path = self.engine_config.model.tokenizer or info.model_dir
            self.tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained, tokenizer_path)
            self.max_model_len = info.max_model_len
            if self.options.generation_config == "auto":
                self.sampling_defaults = read_sampling_defaults(info.model_dir)
                if self.sampling_defaults:
                    logger.info("sampling defaults from generation_config.json",
                                extra={"fields": self.sampling_defaults})
            metrics = ServerMetrics(
                self.model_name, info.max_model_len, lambda: engine.latest_stats, device=info.device,
                engine_pid=engine.pid, max_num_seqs=self.engine_config.scheduler.max_num_seqs,
                engine_alive=lambda: engine.is_alive,
            )
            engine.on_step = lambda stats, _: metrics.observe_step(stats.last_step_num_tokens)
            engine.on_death = self._engine_died
            self.engine, self.metrics = engine, metrics
            if self.options.warmup:
                await self._warmup()
            freeze_heap("server")
        except Exception as exc:  # reported in /v1/status and the log; the process then exits
            if engine.info is not None:
                await engine.shutdown()
            self.load_error = " ".join(f"{type(exc).__name__}: {exc}".split())
            self.phase = Phase.FAILED
            logger.error("model failed to load: %s", self.load_error)
            if self.on_failure is not None:
                self.on_failure()
            return
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY
            logger.info("ready", extra={"fields": {"model": self.model_name, "max_model_len": self.max_model_len}})

    async def _warmup(self) -> None:
        if self.engine is None or self.tokenizer is None:
            raise RuntimeError("warm-up needs a loaded engine")
        prompt = self.tokenizer.encode("Hello") or [0]
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        async for _ in await self.engine.generate("warmup", prompt, params):
            pass

    def _engine_died(self, error: BaseException) -> None:
        """The engine cannot serve any more (its requests were already failed): the server stops,
        and exits non-zero, so that `lmserve up`, Docker or Kubernetes starts a fresh one."""
        self.load_error = " ".join(f"{type(error).__name__}: {error}".split())
        self.phase = Phase.FAILED
        logger.error("stopping the server: the engine died", extra={"fields": {"in_flight": self.num_in_flight}})
        if self.on_failure is not None:
            self.on_failure()

    def require_ready(self) -> tuple[EngineClient, Tokenizer]:
        """Engine and tokenizer, or a 503 when the server is loading, draining or its engine died."""
        if self.engine is not None and not self.engine.is_alive and self.phase is not Phase.LOADING:
            raise unavailable("the engine stopped after an error")
        if self.phase is Phase.DRAINING:
            raise unavailable("the server is shutting down")
        if self.phase is not Phase.READY or self.engine is None or self.tokenizer is None:
            raise unavailable("the model is still loading" if self.phase is Phase.LOADING else "the model failed to load")
        return self.engine, self.tokenizer

    def request_started(self) -> None:
        self.num_in_flight += 1
        self._idle.clear()

    def request_ended(self) -> None:
        self.num_in_flight -= 1
        if self.num_in_flight == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Stops taking requests; waits for in-flight ones (at most drain_seconds), then stops the engine."""
        self.phase = Phase.DRAINING
        logger.info("draining", extra={"fields": {"in_flight": self.num_in_flight}})
        if self.num_in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=self.options.drain_seconds)
            except asyncio.TimeoutError:
                logger.warning("drain timeout: cutting %d requests", self.num_in_flight)
        if self.engine is not None:
            await self.engine.shutdown()
