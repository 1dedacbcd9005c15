"""The synchronous engine: add requests, call `step()` until they finish.

No HTTP and no asyncio here; the server drives `step()` from its own thread.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

from lmserve.engine.attention import make_backend
from lmserve.engine.config import EngineConfig
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.loader import load_model
from lmserve.engine.outputs import SequenceOutput
from lmserve.engine.runner import ModelRunner, StepResult
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler, SchedulerOutput
from lmserve.engine.sequence import FinishReason, Sequence

CPU_KV_CACHE_MEMORY = 2 * 2**30
GPU_MEMORY_FRACTION = 0.9


@dataclass
class EngineStats:
    """A snapshot for metrics and status pages."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_steps: int
    last_step_num_tokens: int


class Engine:
    """Runs one model on many requests at once.

    Invariant: every sequence of a request in `_requests` is either in the scheduler or finished;
    a request leaves `_requests` when its last sequence finishes.
    """

    def __init__(self, config: EngineConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        loaded = load_model(config.model)
        self.model_dir: Path = loaded.model_dir
        self.hf_config = loaded.hf_config
        self.max_model_len = loaded.max_model_len
        self.eos_token_ids = loaded.eos_token_ids
        self.vocab_size = loaded.model.vocab_size
        cache = config.cache
        num_blocks = cache.num_blocks or self._blocks_from_memory(loaded)
        self.kv_cache = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(
            config.scheduler, self.kv_cache, self.max_model_len, self.eos_token_ids, clock=clock
        )
        sampler = Sampler(self.vocab_size, self.eos_token_ids, seed=config.model.seed)
        backend = make_backend(config.model.attention_backend, loaded.device, cache.block_size)
        self.runner = ModelRunner(loaded, num_blocks, cache.block_size, sampler, backend)
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._num_steps = 0
        self._last_step_num_tokens = 0

    def _blocks_from_memory(self, loaded) -> int:
        model = loaded.model
        block_bytes = (
            2 * model.num_layers * self.config.cache.block_size * model.num_kv_heads * model.head_dim
            * loaded.dtype.itemsize
        )
        budget = self.config.cache.kv_cache_memory
        if budget is None:
            if loaded.device.type == "cuda":
                import torch

                free, _ = torch.cuda.mem_get_info(loaded.device)
                budget = int(free * GPU_MEMORY_FRACTION)
            else:
                budget = CPU_KV_CACHE_MEMORY
        # More blocks than every running sequence at full length could use only feed the prefix cache.
        useful = self.config.scheduler.max_num_seqs * self.kv_cache_blocks_per_seq()
        num_blocks = min(budget // block_bytes, useful)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory of {budget} bytes holds no block of {block_bytes} bytes")
        return int(num_blocks)

    def kv_cache_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.cache.block_size)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        tenant: str = "",
        arrival_time: float | None = None,
        deadline: float | None = None,
    ) -> None:
        """Queues a request (n sequences). Raises `ValueError` when it can never run."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = self.validate_prompt(prompt_token_ids)
        arrival = self.clock() if arrival_time is None else arrival_time
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                token_ids=list(prompt),
                num_prompt_tokens=len(prompt),
                params=params,
                arrival_time=arrival,
                priority=priority,
                tenant=tenant,
                deadline=deadline,
            )
            for i in range(params.n)
        ]
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def validate_prompt(self, prompt_token_ids: Seq[int]) -> list[int]:
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, but max_model_len is {self.max_model_len} "
                "(prompt and output must fit, with at least one output token)"
            )
        for token_id in prompt:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id!r} is outside the vocabulary [0, {self.vocab_size})")
        if self.kv_cache.num_blocks_needed(len(prompt) + 1) > self.kv_cache.num_blocks:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, more than the KV cache's "
                f"{self.kv_cache.num_blocks * self.kv_cache.block_size} token slots"
            )
        return prompt

    def abort_request(self, request_id: str) -> None:
        """Ends every sequence of the request and frees what they held; unknown ids are ignored."""
        for seq in self._requests.pop(request_id, []):
            self.scheduler.abort(seq, FinishReason.ABORT)

    def stop_sequence(self, request_id: str, index: int) -> None:
        """Ends one sequence with finish reason `stop` (a stop string matched in its text)."""
        seqs = self._requests.get(request_id)
        if seqs is None or not 0 <= index < len(seqs):
            return
        self.scheduler.abort(seqs[index], FinishReason.STOP)
        self._forget_if_done(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[SequenceOutput]:
        """Runs one scheduled batch; returns what each affected sequence gained."""
        output = self.scheduler.schedule()
        step = self.runner.execute(output.scheduled) if output.scheduled else StepResult()
        self._record_prompt_logprobs(output, step)
        received = self.scheduler.update(output, {seq_id: r.token_id for seq_id, r in step.sampled.items()})
        self._num_steps += 1
        self._last_step_num_tokens = output.num_batched_tokens
        outputs = []
        for seq in received:
            logprobs = step.sampled[seq.seq_id].logprobs
            outputs.append(self._output(seq, [seq.token_ids[-1]], None if logprobs is None else [logprobs]))
        outputs.extend(self._output(seq, [], None) for seq in output.finished)
        for out in outputs:
            if out.finished:
                self._forget_if_done(out.request_id)
        return outputs

    def _record_prompt_logprobs(self, output: SchedulerOutput, step: StepResult) -> None:
        """Keeps prompt log-probabilities not recorded yet (a recomputed prompt repeats them)."""
        for scheduled in output.scheduled:
            computed = step.prompt_logprobs.get(scheduled.seq.seq_id)
            if computed is None:
                continue
            first, entries = computed
            recorded = scheduled.seq.prompt_logprobs
            recorded.extend(entries[len(recorded) - first :])

    def _output(self, seq: Sequence, token_ids: list[int], logprobs) -> SequenceOutput:
        first = seq.params.prompt_logprobs is not None and seq.num_output_tokens == 1 and token_ids
        return SequenceOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=token_ids,
            new_logprobs=logprobs,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens or 0,
            queue_seconds=None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time,
            prompt_logprobs=list(seq.prompt_logprobs) if first else None,
        )

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]

    def stats(self) -> EngineStats:
        prefix = self.kv_cache.prefix_stats
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage,
            num_blocks=self.kv_cache.num_blocks,
            prefix_cache_queries=prefix.num_queries,
            prefix_cache_hits=prefix.num_hits,
            num_preemptions=self.scheduler.stats.num_preemptions,
            num_steps=self._num_steps,
            last_step_num_tokens=self._last_step_num_tokens,
        )
