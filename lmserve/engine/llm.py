"""The offline API: `LLM(model=...).generate(prompts, params)` runs a batch to completion."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from lmserve.engine.config import EngineConfig
from lmserve.engine.detokenizer import TextStream
from lmserve.engine.engine import Engine
from lmserve.engine.outputs import CompletionOutput, RequestOutput, SequenceOutput
from lmserve.engine.sampling_params import SamplingParams
from lmserve.engine.tokenizer import Tokenizer

Prompt = str | Seq[int]


class LLM:
    """A model loaded for offline batch generation.

    Keyword arguments are engine settings (`dtype`, `max_model_len`, `block_size`, `num_blocks`,
    `kv_cache_memory`, `enable_prefix_caching`, `max_num_seqs`, `max_num_batched_tokens`, ...).
    """

    def __init__(self, model: str, **settings: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(model=model, **settings))
        tokenizer_path = self.engine.config.model.tokenizer or self.engine.model_dir
        self.tokenizer = Tokenizer.from_pretrained(tokenizer_path) if Tokenizer.exists(tokenizer_path) else None
        self._request_ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt (text, or a list of token ids); results come in prompt order.

        Every prompt is validated before any runs: a bad one raises `ValueError` and nothing starts.
        """
        prompt_list = self._as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        encoded = [self._encode(p) for p in prompt_list]
        return self._run(prompt_list, encoded, params_list, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation or a list of them, using the model's chat template."""
        tokenizer = self._require_tokenizer()
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [tokenizer.render_chat(list(c)) for c in conversations]  # type: ignore[arg-type]
        encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        params_list = self._as_params_list(sampling_params, len(texts))
        return self._run(list(texts), encoded, params_list, use_tqdm)

    def _run(
        self, prompts: list[Prompt], encoded: list[list[int]], params_list: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        for ids, params in zip(encoded, params_list):
            self.engine.validate_prompt(ids)
            if params.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer, and this model directory has none")
        results: dict[str, RequestOutput] = {}
        streams: dict[tuple[str, int], TextStream] = {}
        for prompt, ids, params in zip(prompts, encoded, params_list):
            request_id = str(next(self._request_ids))
            self.engine.add_request(request_id, ids, params)
            results[request_id] = RequestOutput(
                request_id,
                prompt if isinstance(prompt, str) else None,
                ids,
                [CompletionOutput(i, "", [], None, [] if params.logprobs is not None else None) for i in range(params.n)],
            )
            if self.tokenizer is not None:
                for i in range(params.n):
                    streams[(request_id, i)] = TextStream(self.tokenizer, ids, params)
        total = sum(p.n for p in params_list)
        with tqdm(total=total, desc="generating", unit="seq", disable=not use_tqdm or total < 2) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    self._apply(out, results[out.request_id], streams.get((out.request_id, out.index)))
                    if out.finished:
                        bar.update(1)
        return list(results.values())

    def _apply(self, out: SequenceOutput, result: RequestOutput, stream: TextStream | None) -> None:
        completion = result.outputs[out.index]
        if completion.finish_reason is not None:
            return  # already ended by a stop string
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and completion.logprobs is not None:
            completion.logprobs.extend(out.new_logprobs)
        result.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        finish = out.finish_reason.value if out.finish_reason else None
        if stream is not None:
            completion.text += stream.push(out.new_token_ids)
            if stream.stopped and finish is None:
                self.engine.stop_sequence(out.request_id, out.index)
                finish = "stop"
            if finish is not None:
                completion.text += stream.finish()
        completion.finish_reason = finish

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._require_tokenizer().encode(prompt)
        return list(prompt)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{self.engine.model_dir} has no tokenizer; pass prompts as token ids")
        return self.tokenizer

    @staticmethod
    def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [prompts]  # one prompt of token ids
        for p in prompts:
            if not isinstance(p, str) and not (isinstance(p, Seq) and all(isinstance(t, int) for t in p)):
                raise ValueError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}")
        return prompts

    @staticmethod
    def _as_params_list(
        params: SamplingParams | Seq[SamplingParams] | None, count: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(count)]
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"{len(params)} sampling params for {count} prompts")
        return params
