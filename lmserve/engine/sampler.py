"""Picks the next token of every sampling sequence in a step, in one batch.

Order of processing (each only for the rows that ask for it): log-probabilities of the raw model
distribution; min_tokens (suppress end tokens); repetition / presence / frequency penalties; logit_bias;
grammar masks of constrained rows (structured outputs: one mask batch for those rows, the free
rows untouched); greedy rows take the argmax; the others are divided by temperature, filtered by top-k, top-p and
min-p, and sampled. A request with a seed draws its randomness from (seed, sample index, output
position) alone, so what runs beside it, chunking and preemption never change its tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lmserve.engine.grammar import StructuredDecoder
from lmserve.engine.sequence import Sequence

_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 rounds)."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = ((state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        state ^= state >> 31
        state = (state * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 29
    return state & ((1 << 63) - 1)


@dataclass
class TokenLogprobs:
    """Log-probability of the chosen token, its rank (1 = most likely) and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


class Sampler:
    def __init__(
        self, vocab_size: int, eos_token_ids: Iterable[int], seed: int = 0,
        structured: StructuredDecoder | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.structured = structured
        """The matchers of constrained sequences; None when the engine constrains nothing."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """logits [N, V] (float32) for the N sequences in `seqs`, in the same order."""
        params = [s.params for s in seqs]
        if all(p.is_greedy and not p.has_penalties and p.logprobs is None and not p.min_tokens
               and p.structured is None and not p.logit_bias for p in params):
            return [SampleResult(t) for t in logits.argmax(dim=-1).tolist()]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        self._suppress_end_tokens(logits, seqs)
        self._apply_penalties(logits, seqs)
        self._apply_logit_bias(logits, seqs)
        self._apply_grammars(logits, seqs)
        token_ids = self._choose(logits, seqs)
        results = [SampleResult(t) for t in token_ids]
        if raw_logprobs is not None:
            for row, (seq, result) in enumerate(zip(seqs, results)):
                if seq.params.logprobs is not None:
                    result.logprobs = token_logprobs(raw_logprobs[row], result.token_id, seq.params.logprobs)
        return results

    def _suppress_end_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                ids = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                ids = [i for i in ids if 0 <= i < logits.shape[1]]
                if ids:
                    logits[row, ids] = float("-inf")

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return
        vocab = logits.shape[1]
        device = logits.device
        counts = torch.zeros(len(rows), vocab, device=device)
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
        for j, row in enumerate(rows):
            seq = seqs[row]
            output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            counts[j].index_add_(0, output, torch.ones(len(output), device=device))
            seen[j, torch.tensor(seq.prompt_token_ids, dtype=torch.long, device=device)] = True
        seen |= counts > 0
        index = torch.tensor(rows, device=device)
        selected = logits[index]
        rep = torch.tensor([seqs[r].params.repetition_penalty for r in rows], device=device)[:, None]
        penalised = torch.where(selected > 0, selected / rep, selected * rep)
        selected = torch.where(seen, penalised, selected)
        freq = torch.tensor([seqs[r].params.frequency_penalty for r in rows], device=device)[:, None]
        pres = torch.tensor([seqs[r].params.presence_penalty for r in rows], device=device)[:, None]
        selected = selected - freq * counts - pres * (counts > 0).to(selected.dtype)
        logits[index] = selected

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            bias = seq.params.logit_bias
            if bias:
                # Ids past the logits' width (a server checks them against the vocabulary) are skipped.
                ids = [i for i in bias if i < logits.shape[1]]
                logits[row, ids] += torch.tensor([bias[i] for i in ids], dtype=logits.dtype, device=logits.device)

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Sets the logits of the tokens a constrained row's grammar forbids to -inf, for all
        constrained rows at once; other rows are not touched (nor copied)."""
        structured = self.structured
        if structured is None or not len(structured):
            return
        rows = [i for i, s in enumerate(seqs) if structured.is_constrained(s)]
        if not rows:
            return
        allowed = structured.allowed_tokens([seqs[r] for r in rows], logits.shape[1])
        index = torch.tensor(rows, device=logits.device)
        forbidden = ~torch.from_numpy(allowed).to(logits.device)
        logits[index] = logits[index].masked_fill(forbidden, float("-inf"))

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        token_ids = logits.argmax(dim=-1)
        rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            probs = self._filtered_probs(logits[index], [seqs[r].params for r in rows])
            noise = torch.empty_like(probs)
            for j, row in enumerate(rows):
                noise[j].exponential_(generator=self._row_generator(seqs[row], logits.device))
            # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
            token_ids[index] = (probs / noise).argmax(dim=-1)
        return token_ids.tolist()

    def _filtered_probs(self, logits: torch.Tensor, params: list) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        logits = logits / temperature
        top_k = [p.top_k for p in params]
        if any(top_k):
            k = torch.tensor([t if t else logits.shape[1] for t in top_k], device=device)
            k = k.clamp(max=logits.shape[1])
            sorted_desc = logits.sort(dim=-1, descending=True).values
            kth = sorted_desc.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens before it already reach top_p (always keep the first).
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
            threshold = probs.max(dim=-1, keepdim=True).values * min_p
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _row_generator(self, seq: Sequence, device: torch.device) -> torch.Generator:
        if seq.params.seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(derive_seed(seq.params.seed, seq.index, seq.num_output_tokens))
            return generator
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(derive_seed(self.seed))
        return self.generator


def token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """The chosen token's log-probability and rank, and the `num_top` most likely tokens."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum().item()) + 1
    top: list[tuple[int, float]] = []
    if num_top:
        values, ids = logprobs.topk(num_top)
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprobs(token_id, float(chosen.item()), rank, top)
