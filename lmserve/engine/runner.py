"""Turns a scheduled step into flat tensors, runs the model, samples. The only module that builds
tensors from sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.engine.attention import AttentionBackend, ForwardContext, SequenceSlice
from lmserve.engine.attention.torch_backend import TorchAttentionBackend
from lmserve.engine.loader import LoadedModel
from lmserve.engine.sampler import SampleResult, Sampler
from lmserve.engine.scheduler import ScheduledSequence
from lmserve.engine.sequence import Sequence


class ModelRunner:
    """Owns the model and its KV cache tensors.

    Invariant: `kv_caches[layer]` holds, for every block the KV manager handed out, the keys and
    values of the tokens the scheduler has counted as computed.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
        backend: AttentionBackend | None = None,
    ) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.block_size = block_size
        self.sampler = sampler
        self.backend: AttentionBackend = backend or TorchAttentionBackend(block_size)
        self.kv_caches = self.backend.allocate_cache(
            self.model.num_layers,
            num_blocks,
            block_size,
            self.model.num_kv_heads,
            self.model.head_dim,
            self.dtype,
            self.device,
        )

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> dict[int, SampleResult]:
        """Computes the scheduled tokens; returns the sampled token of each sequence that samples."""
        # Single-token slices (decodes) first: the backend batches them together.
        ordered = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        inputs = self._prepare(ordered)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.ctx)
        if not inputs.sampling_seqs:
            return {}
        logits = self.model.compute_logits(hidden[inputs.logits_rows])
        results = self.sampler(logits, inputs.sampling_seqs)
        return {seq.seq_id: result for seq, result in zip(inputs.sampling_seqs, results)}

    def _prepare(self, ordered: list[ScheduledSequence]) -> _StepInputs:
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        slices: list[SequenceSlice] = []
        logits_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
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
            offset += n
        device = self.device
        slot_mapping = torch.from_numpy(np.concatenate(slots)).to(device)
        ctx = ForwardContext(
            backend=self.backend,
            metadata=self.backend.build_metadata(slices, slot_mapping, device),
            kv_caches=self.kv_caches,
        )
        return _StepInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.from_numpy(np.concatenate(positions)).to(device),
            ctx=ctx,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
            sampling_seqs=sampling_seqs,
        )


@dataclass(slots=True)
class _StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    ctx: ForwardContext
    logits_rows: torch.Tensor
    sampling_seqs: list[Sequence]
