"""Turns a scheduled step into flat tensors, runs the model, samples. The only module that builds
tensors from sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from lmserve.engine.attention import AttentionBackend, ForwardContext, SequenceSlice
from lmserve.engine.loader import LoadedModel
from lmserve.engine.sampler import Sampler, SampleResult, TokenLogprobs, token_logprobs
from lmserve.engine.scheduler import ScheduledSequence
from lmserve.engine.sequence import Sequence


class ModelRunner:
    """Owns the model, its KV cache tensors and the CPU swap pool.

    Invariant: `kv_caches[layer]` holds, for every block the KV manager handed out, the keys and
    values of the tokens the scheduler has counted as computed; `cpu_caches[layer]` holds the
    same for every CPU block of a swapped-out sequence.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
        backend: AttentionBackend,
        num_cpu_blocks: int = 0,
    ) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = block_size
        self.sampler = sampler
        self.backend = backend
        self.kv_caches = self.backend.allocate_cache(
            self.model.num_layers,
            num_blocks,
            block_size,
            self.model.num_kv_heads,
            self.model.head_dim,
            self.dtype,
            self.device,
        )
        self.cpu_caches: list[torch.Tensor] = []
        if num_cpu_blocks:
            self.cpu_caches = self.backend.allocate_cache(
                self.model.num_layers,
                num_cpu_blocks,
                block_size,
                self.model.num_kv_heads,
                self.model.head_dim,
                self.dtype,
                torch.device("cpu"),
            )

    @torch.inference_mode()
    def swap_blocks(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copies (device, CPU) pairs to the CPU pool, then (CPU, device) pairs back, in that order:
        a device block read by a swap-out may be written by a swap-in of the same step."""
        if swap_out:
            self.backend.copy_blocks(self.kv_caches, self.cpu_caches, swap_out)
        if swap_in:
            self.backend.copy_blocks(self.cpu_caches, self.kv_caches, swap_in)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> StepResult:
        """Computes the scheduled tokens; samples a token for each sequence that samples."""
        # Single-token slices (decodes) first: the backend batches them together.
        ordered = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        inputs = self._prepare(ordered)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        result = StepResult()
        if inputs.sampling_seqs:
            logits = self.model.compute_logits(hidden if inputs.ctx.output_rows is not None else hidden[inputs.logits_rows])
            samples = self.sampler(logits, inputs.sampling_seqs)
            result.sampled = {seq.seq_id: sample for seq, sample in zip(inputs.sampling_seqs, samples)}
        for seq, first_target, rows in inputs.prompt_logprob_rows:
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]), dim=-1)
            targets = seq.token_ids[first_target : first_target + len(rows)]
            num_top = seq.params.prompt_logprobs or 0
            result.prompt_logprobs[seq.seq_id] = (
                first_target, [token_logprobs(row, t, num_top) for row, t in zip(logprobs, targets)]
            )
        return result

    def _prepare(self, ordered: list[ScheduledSequence]) -> _StepInputs:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        slices: list[SequenceSlice] = []
        logits_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        prompt_logprob_rows: list[tuple[Sequence, int, list[int]]] = []
        offset = 0
        for s in ordered:
            n, start = s.num_new_tokens, s.start
            token_ids.extend(s.seq.token_ids[start : start + n])
            pos = np.arange(start, start + n, dtype=np.int64)
            positions.append(pos)
            slots.append(np.asarray(s.block_ids, dtype=np.int64)[pos // bs] * bs + pos % bs)
            slices.append(SequenceSlice(offset, n, start + n, s.block_ids))
            if s.samples:
                logits_rows.append(offset + n - 1)
                sampling_seqs.append(s.seq)
            # Row i predicts token start + i + 1; prompt log-probabilities cover prompt tokens 1..P-1.
            last_target = min(start + n, s.seq.num_prompt_tokens - 1)
            if s.seq.params.prompt_logprobs is not None and start < last_target:
                prompt_logprob_rows.append((s.seq, start + 1, list(range(offset, offset + last_target - start))))
            offset += n
        device = self.device
        slot_mapping = torch.from_numpy(np.concatenate(slots)).to(device)
        logits_rows_t = torch.tensor(logits_rows, dtype=torch.long, device=device)
        # Only the sampled rows go past the last layer's attention, unless prompt log-probabilities
        # need the others or every row samples anyway (a step of decodes).
        prune = not prompt_logprob_rows and len(logits_rows) < offset
        ctx = ForwardContext(
            backend=self.backend,
            metadata=self.backend.build_metadata(slices, slot_mapping, device),
            kv_caches=self.kv_caches,
            output_rows=logits_rows_t if prune else None,
        )
        return _StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.from_numpy(np.concatenate(positions)).to(device),
            ctx=ctx,
            logits_rows=logits_rows_t,
            sampling_seqs=sampling_seqs,
            prompt_logprob_rows=prompt_logprob_rows,
        )


@dataclass(slots=True)
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    logits_rows: torch.Tensor
    sampling_seqs: list[Sequence]
    prompt_logprob_rows: list[tuple[Sequence, int, list[int]]]


@dataclass
class StepResult:
    """What one forward pass produced."""

    sampled: dict[int, SampleResult] = field(default_factory=dict)
    """seq_id -> the token sampled for it."""
    prompt_logprobs: dict[int, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    """seq_id -> (index of the first prompt token covered, log-probabilities of consecutive prompt tokens)."""
