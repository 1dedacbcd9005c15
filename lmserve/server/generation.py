"""One prompt's sequences through the engine, as text deltas with exact usage and timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from lmserve.engine.async_engine import EngineClient
from lmserve.engine.detokenizer import TextStream
from lmserve.engine.outputs import SequenceOutput
from lmserve.engine.sampler import TokenLogprobs
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.tokenizer import Tokenizer


class RequestTimedOut(Exception):
    """A sequence ended with finish reason `timeout`: it waited past its queue timeout, or could no
    longer meet its deadline, before its first token. The answer would be empty or incomplete, so it
    is reported as an error, never as a finished choice."""


@dataclass
class Delta:
    """What one choice gained: text (stop strings applied), tokens, log-probabilities, maybe an end."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None


@dataclass
class _SequenceState:
    stream: TextStream
    num_tokens: int = 0
    finish_reason: str | None = None
    last_token_time: float | None = None


@dataclass
class Generation:
    """Runs `params.n` sequences of one prompt. Usage counts only tokens the client receives:
    a sequence stopped by a stop string counts up to the token that completed the match."""

    engine: EngineClient
    tokenizer: Tokenizer
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    tenant: str = ""
    index_offset: int = 0
    arrival: float = field(default_factory=time.monotonic)
    num_cached_tokens: int = 0
    queue_seconds: float | None = None
    first_token_time: float | None = None
    inter_token_seconds: list[float] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Filled with the first token when the params ask for prompt log-probabilities."""
    _seqs: list[_SequenceState] = field(default_factory=list)
    _outputs: AsyncIterator[SequenceOutput] | None = None

    def __post_init__(self) -> None:
        self._seqs = [_SequenceState(TextStream(self.tokenizer, self.prompt_token_ids, self.params))
                      for _ in range(self.params.n)]

    @property
    def num_completion_tokens(self) -> int:
        return sum(s.num_tokens for s in self._seqs)

    @property
    def finish_reasons(self) -> list[str | None]:
        return [s.finish_reason for s in self._seqs]

    async def start(self) -> None:
        """Submits the request; raises what the engine refuses it with (ValueError, overload)."""
        self._outputs = await self.engine.generate(
            self.request_id, self.prompt_token_ids, self.params, priority=self.priority, tenant=self.tenant
        )

    async def close(self) -> None:
        """Gives up on the request (aborting it in the engine if it still runs)."""
        if self._outputs is not None:
            await self._outputs.aclose()  # type: ignore[attr-defined]

    async def deltas(self) -> AsyncIterator[Delta]:
        """The choices' deltas as the engine makes them; raises RequestTimedOut for a timeout."""
        if self._outputs is None:
            raise RuntimeError("Generation.start() was not awaited")
        async for out in self._outputs:
            seq = self._seqs[out.index]
            if seq.finish_reason is not None:
                continue
            self._observe_timing(seq, out.new_token_ids)
            if out.index == 0:
                self.num_cached_tokens = out.num_cached_tokens
            if out.prompt_logprobs is not None and self.prompt_logprobs is None:
                self.prompt_logprobs = out.prompt_logprobs
            if out.queue_time is not None and self.queue_seconds is None:
                self.queue_seconds = out.queue_time
            seq.num_tokens += len(out.new_token_ids)
            text = seq.stream.push(out.new_token_ids)
            finish = out.finish_reason.value if out.finish_reason is not None else None
            if seq.stream.stopped and finish is None:
                self.engine.stop_sequence(self.request_id, out.index)
                finish = "stop"
            if finish is not None:
                text += seq.stream.finish()
            seq.finish_reason = finish
            if finish == "timeout":
                raise RequestTimedOut("The request was not started within the server's queue timeout "
                                      "(the server is at capacity); retry later or on another server.")
            yield Delta(self.index_offset + out.index, text, out.new_token_ids, out.new_logprobs or [], finish)

    def _observe_timing(self, seq: _SequenceState, token_ids: list[int]) -> None:
        if not token_ids:
            return
        now = time.monotonic()
        if self.first_token_time is None:
            self.first_token_time = now
        if seq.last_token_time is not None:
            self.inter_token_seconds.append(now - seq.last_token_time)
        seq.last_token_time = now


async def merge(generations: list[Generation]) -> AsyncIterator[Delta]:
    """The deltas of several generations as they come; an error in one ends all."""
    if len(generations) == 1:
        async for delta in generations[0].deltas():
            yield delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(generation: Generation) -> None:
        try:
            async for delta in generation.deltas():
                await queue.put(delta)
            await queue.put(done)
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
