"""The synchronous engine: add requests, call `step()` until they finish.

No HTTP and no asyncio here; the server drives `step()` from a thread or a process of its own
(lmserve.engine.async_engine).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from lmserve.engine.attention import make_backend
from lmserve.engine.attention.cpu_backend import CPUAttentionBackend
from lmserve.engine.config import EngineConfig, PreemptionMode
from lmserve.engine.grammar import GrammarCompiler, StructuredDecoder
from lmserve.engine.kernels import tune_malloc, use_native_kernels
from lmserve.engine.kv_cache import KVCacheManager
from lmserve.engine.loader import load_model
from lmserve.engine.outputs import SequenceOutput
from lmserve.engine.quantization import memory_report
from lmserve.engine.runner import ModelRunner, StepResult
from lmserve.engine.sampler import Sampler
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.scheduler import Scheduler, SchedulerOutput
from lmserve.engine.sequence import FinishReason, Sequence
from lmserve.engine.stats import TenantStats

CPU_KV_CACHE_MEMORY = 2 * 2**30
GPU_MEMORY_FRACTION = 0.9


@dataclass
class EngineStats:
    """A snapshot for metrics and status pages. Counts are of sequences (a request with n > 1 has
    n); `num_*` totals since start only grow, except the gauges num_running/waiting/swapped,
    num_queued_* and the usages."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    """Both modes together."""
    num_steps: int
    last_step_num_tokens: int
    num_swapped: int = 0
    num_recompute_preemptions: int = 0
    num_swap_preemptions: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    cpu_kv_cache_usage: float = 0.0
    """Fraction of the CPU swap pool in use (0 when preemption_mode is recompute)."""
    num_cpu_blocks: int = 0
    num_queued_requests: int = 0
    """Requests that have not started (what max_queued_requests bounds)."""
    num_queued_tokens: int = 0
    """Their prompt tokens (what max_queued_tokens bounds)."""
    num_started: int = 0
    """Sequences that left the queue; with queue_time_seconds_sum gives the mean queue time."""
    queue_time_seconds_sum: float = 0.0
    num_timeouts: int = 0
    """Sequences ended by queue timeout or deadline."""
    num_rejected: int = 0
    """Requests refused with EngineOverloaded."""
    tenants: dict[str, TenantStats] = field(default_factory=dict)
    """Per tenant label: the first max_tenant_labels tenants seen, the rest under "other"."""
    device_memory_allocated: int = 0
    """Bytes PyTorch holds on a CUDA device (0 on CPU)."""
    device_memory_reserved: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass(frozen=True)
class PromptLimits:
    """What a prompt must satisfy to be accepted; constants of a loaded engine, so a caller can
    check a prompt without reaching the engine."""

    max_model_len: int
    vocab_size: int
    kv_token_slots: int
    """Tokens the whole KV cache holds: a prompt and its first output token must fit."""

    def validate(self, prompt_token_ids: Seq[int]) -> list[int]:
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
        if len(prompt) + 1 > self.kv_token_slots:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, more than the KV cache's {self.kv_token_slots} token slots"
            )
        return prompt


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine tells the process that serves it."""

    model_dir: Path
    max_model_len: int
    device: str
    """torch device: cpu, cuda:0, ..."""
    limits: PromptLimits


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
        num_cpu_blocks = self._cpu_blocks(loaded)
        logging.getLogger("lmserve.engine").info(memory_report(
            loaded.quantization, loaded.dtype, loaded.weight_bytes, loaded.unquantized_weight_bytes,
            self._block_bytes(loaded)))
        self.kv_cache = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching, num_cpu_blocks,
                                       share_across_tenants=cache.share_prefix_cache_across_tenants)
        self.scheduler = Scheduler(
            config.scheduler, self.kv_cache, self.max_model_len, self.eos_token_ids, clock=clock
        )
        tokenizer_path = config.model.tokenizer or self.model_dir
        compiler = GrammarCompiler(tokenizer_path, self.vocab_size, self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.structured = StructuredDecoder(compiler)
        sampler = Sampler(self.vocab_size, self.eos_token_ids, seed=config.model.seed, structured=self.structured)
        backend = make_backend(config.model.attention_backend, loaded.device, cache.block_size)
        if isinstance(backend, CPUAttentionBackend):
            use_native_kernels(loaded.model, backend.kernels)
        if loaded.device.type == "cpu":
            tune_malloc()
        self.runner = ModelRunner(loaded, num_blocks, cache.block_size, sampler, backend, num_cpu_blocks)
        self.limits = PromptLimits(self.max_model_len, self.vocab_size, num_blocks * cache.block_size)
        self._requests: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self._num_steps = 0
        self._last_step_num_tokens = 0

    def _block_bytes(self, loaded) -> int:
        model = loaded.model
        return (
            2 * model.num_layers * self.config.cache.block_size * model.num_kv_heads * model.head_dim
            * loaded.dtype.itemsize
        )

    def _cpu_blocks(self, loaded) -> int:
        """Blocks of the CPU swap pool: none unless preemption_mode is swap."""
        scheduler = self.config.scheduler
        if scheduler.preemption_mode != PreemptionMode.SWAP:
            return 0
        if scheduler.num_cpu_blocks is not None:
            return scheduler.num_cpu_blocks
        useful = scheduler.max_num_seqs * self.kv_cache_blocks_per_seq()
        return min(scheduler.swap_space_bytes // self._block_bytes(loaded), useful)

    def _blocks_from_memory(self, loaded) -> int:
        block_bytes = self._block_bytes(loaded)
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
        queue_timeout: float | None = None,
    ) -> None:
        """Queues a request (n sequences).

        `priority`: lower runs first under the priority policy. `tenant`: whom the request is
        accounted to (fair policy, per-tenant stats). `arrival_time`, `deadline`: times on this
        engine's `clock`; the deadline is when the first token must exist at the latest, else
        the request ends with finish reason timeout. `queue_timeout`: seconds after arrival the
        request may wait to start (default: the scheduler config's), else it ends with timeout.

        Raises `ValueError` when the request can never run, and `EngineOverloaded` (changing
        nothing) when the queue is full.
        """
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt = self.validate_prompt(prompt_token_ids)
        if deadline is not None and math.isnan(deadline):
            raise ValueError("deadline must be a time on the engine clock, got NaN")
        if queue_timeout is None:
            queue_timeout = self.config.scheduler.queue_timeout
        elif not queue_timeout > 0:
            raise ValueError(f"queue_timeout must be > 0 seconds, got {queue_timeout}")
        self.scheduler.check_admission(tenant, len(prompt))
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
                queue_timeout=None if queue_timeout is None else arrival + queue_timeout,
            )
            for i in range(params.n)
        ]
        self.structured.add(seqs)  # compiles the schema first: a bad one raises, adding nothing
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def validate_prompt(self, prompt_token_ids: Seq[int]) -> list[int]:
        return self.limits.validate(prompt_token_ids)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(self.model_dir, self.max_model_len, str(self.runner.device), self.limits)

    def abort_request(self, request_id: str) -> None:
        """Ends every sequence of the request and frees what they held; unknown ids are ignored."""
        for seq in self._requests.pop(request_id, []):
            self.scheduler.abort(seq, FinishReason.ABORT)
            self.structured.release(seq.seq_id)

    def stop_sequence(self, request_id: str, index: int) -> None:
        """Ends one sequence with finish reason `stop` (a stop string matched in its text)."""
        seqs = self._requests.get(request_id)
        if seqs is None or not 0 <= index < len(seqs):
            return
        self.scheduler.abort(seqs[index], FinishReason.STOP)
        self.structured.release(seqs[index].seq_id)
        self._forget_if_done(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[SequenceOutput]:
        """Runs one scheduled batch; returns what each affected sequence gained."""
        output = self.scheduler.schedule()
        started = self.clock()
        self.runner.swap_blocks(output.swap_out, output.swap_in)
        step = self.runner.execute(output.scheduled) if output.scheduled else StepResult()
        self.scheduler.record_step(output.num_batched_tokens, self.clock() - started)
        self._record_prompt_logprobs(output, step)
        received = self.scheduler.update(output, {seq_id: r.token_id for seq_id, r in step.sampled.items()})
        self._end_completed_grammars(received)
        self._num_steps += 1
        self._last_step_num_tokens = output.num_batched_tokens
        outputs = []
        for seq in received:
            logprobs = step.sampled[seq.seq_id].logprobs
            outputs.append(self._output(seq, [seq.token_ids[-1]], None if logprobs is None else [logprobs]))
        outputs.extend(self._output(seq, [], None) for seq in output.finished)
        for seq in [*received, *output.finished]:
            if seq.is_finished:
                self.structured.release(seq.seq_id)
        for out in outputs:
            if out.finished:
                self._forget_if_done(out.request_id)
        return outputs

    def _end_completed_grammars(self, received: list[Sequence]) -> None:
        """Ends (finish reason stop) the constrained sequences whose JSON is complete: nothing but
        end-of-sequence could follow, so the step that would sample it is saved."""
        if not len(self.structured):
            return
        for seq in self.structured.completed(received):
            if not seq.is_finished:
                self.scheduler.abort(seq, FinishReason.STOP)

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
            queue_time=None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time,
            prompt_logprobs=list(seq.prompt_logprobs) if first else None,
        )

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]

    def stats(self) -> EngineStats:
        prefix = self.kv_cache.prefix_stats
        scheduler = self.scheduler
        counts = scheduler.stats
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage,
            num_blocks=self.kv_cache.num_blocks,
            prefix_cache_queries=prefix.num_queries,
            prefix_cache_hits=prefix.num_hits,
            num_preemptions=counts.num_preemptions,
            num_steps=self._num_steps,
            last_step_num_tokens=self._last_step_num_tokens,
            num_swapped=scheduler.num_swapped,
            num_recompute_preemptions=counts.num_recompute_preemptions,
            num_swap_preemptions=counts.num_swap_preemptions,
            num_blocks_swapped_out=counts.num_blocks_swapped_out,
            num_blocks_swapped_in=counts.num_blocks_swapped_in,
            cpu_kv_cache_usage=self.kv_cache.cpu_usage,
            num_cpu_blocks=self.kv_cache.num_cpu_blocks,
            num_queued_requests=scheduler.admission.num_queued_requests,
            num_queued_tokens=scheduler.admission.num_queued_tokens,
            num_started=counts.num_started,
            queue_time_seconds_sum=counts.queue_time_seconds_sum,
            num_timeouts=counts.num_timeouts,
            num_rejected=counts.num_rejected,
            tenants=counts.tenant_snapshot(scheduler.live_sequences()),
            **self._device_memory(),
        )

    def _device_memory(self) -> dict[str, int]:
        device = self.runner.device
        if device.type != "cuda":
            return {}
        import torch

        return {"device_memory_allocated": torch.cuda.memory_allocated(device),
                "device_memory_reserved": torch.cuda.memory_reserved(device)}
