"""Request fields -> engine SamplingParams, rejecting what the engine cannot do (a 400 with the reason).

Everything that reaches rank 0's sampler must be safe: a NaN temperature or an out-of-range seed would
crash the sampler, and a crashed rank takes the whole engine down, so bad input must stop here."""
from __future__ import annotations

from dataclasses import dataclass

from dcpserve.engine.sampler import SamplingParams
from dcpserve.server.errors import bad_request
from dcpserve.server.protocol import NativeSamplingParams, SamplingFields, StopField

MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (dividing logits by ~0 overflows)
SEED_MOD = 2 ** 64  # torch generators take 64-bit seeds


@dataclass(frozen=True)
class ModelInfo:
    name: str
    vocab_size: int
    context_length: int
    capacity_tokens: int
    has_tokenizer: bool

    @property
    def max_total_tokens(self) -> int:
        return min(self.context_length, self.capacity_tokens)


@dataclass
class OutputOptions:
    """What the server does with the tokens (the engine never sees these)."""

    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True


def default_chat_max_tokens(info: ModelInfo, prompt_len: int) -> int:
    left = info.max_total_tokens - prompt_len
    if left < 1:
        raise bad_request(f"prompt ({prompt_len} tokens) leaves no room to generate: the limit is "
                          f"{info.max_total_tokens} tokens (context length / KV capacity)", "messages")
    return left


def stop_strings(stop: StopField, info: ModelInfo, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in items):
        raise bad_request("stop strings must be non-empty", param)
    if items and not info.has_tokenizer:
        raise bad_request("stop strings need a tokenizer; this model has no tokenizer.json (use stop_token_ids)", param)
    return items


def make_params(*, max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
                seed: int | None, stop_token_ids: list[int] | None, ignore_eos: bool, stop: tuple[str, ...],
                info: ModelInfo, max_tokens_param: str = "max_tokens") -> SamplingParams:
    if max_tokens < 1:
        raise bad_request(f"{max_tokens_param} must be at least 1 (got {max_tokens})", max_tokens_param)
    temperature = 1.0 if temperature is None else temperature
    if temperature < 0:
        raise bad_request(f"temperature must be >= 0 (got {temperature})", "temperature")
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = 1.0 if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p must be in (0, 1] (got {top_p})", "top_p")
    top_k = -1 if top_k in (None, 0) else top_k
    if top_k < -1:
        raise bad_request(f"top_k must be -1 or 0 (off) or >= 1 (got {top_k})", "top_k")
    if top_k > info.vocab_size:
        top_k = -1  # keeping every token is the same as no top-k
    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                          ignore_eos=ignore_eos, seed=None if seed is None else seed % SEED_MOD,
                          stop_token_ids=tuple(stop_token_ids or ()), stop=stop)


def openai_params(req: SamplingFields, info: ModelInfo,
                  default_max_tokens: int) -> tuple[SamplingParams, OutputOptions]:
    if req.n != 1:
        raise bad_request(f"n must be 1 (got {req.n}); send one request per completion", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported", name)
    if req.max_completion_tokens is not None:
        max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    elif req.max_tokens is not None:
        max_tokens, param = req.max_tokens, "max_tokens"
    else:
        max_tokens, param = default_max_tokens, "max_tokens"
    stop = stop_strings(req.stop, info)
    params = make_params(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                         seed=req.seed, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, stop=stop,
                         info=info, max_tokens_param=param)
    return params, OutputOptions(stop, req.include_stop_str_in_output, req.skip_special_tokens)


def native_params(sp: NativeSamplingParams, info: ModelInfo) -> tuple[SamplingParams, OutputOptions]:
    stop = stop_strings(sp.stop, info, "sampling_params.stop")
    params = make_params(max_tokens=sp.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                         seed=sp.seed, stop_token_ids=sp.stop_token_ids, ignore_eos=sp.ignore_eos, stop=stop,
                         info=info, max_tokens_param="sampling_params.max_new_tokens")
    return params, OutputOptions(stop, False, sp.skip_special_tokens)
