"""In-process pieces of the server: chat encoding (built-in DeepSeek-V3.2 and jinja), incremental
detokenization, stop strings, sampling-parameter checks, metrics text, and the benchmark's metric math."""
from __future__ import annotations

import argparse
import json

import pytest

from dcpserve.bench.serving import RequestResult, draw_lengths, summarize
from dcpserve.server.chat import (ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, ChatFormatter, ChatTemplateError,
                                  Message)
from dcpserve.server.detokenize import IncrementalDetokenizer, OutputProcessor
from dcpserve.server.errors import APIError
from dcpserve.server.metrics import ServerMetrics, parse_metrics
from dcpserve.server.protocol import CompletionRequest
from dcpserve.server.sampling import ModelInfo, openai_params

INFO = ModelInfo(name="m", vocab_size=512, context_length=512, capacity_tokens=10_000, has_tokenizer=True)


# -- chat ------------------------------------------------------------------------------------------------
def test_deepseek_v32_encoding_non_thinking_and_thinking():
    msgs = [Message("system", "Be brief."), Message("user", "hello"), Message("assistant", "Hi!", "thought"),
            Message("user", "1+1=?")]
    fmt = ChatFormatter()
    assert fmt.render(msgs, {"thinking": False}) == (
        f"{BOS}Be brief.{USER}hello{ASSISTANT}{THINK_END}Hi!{EOS}{USER}1+1=?{ASSISTANT}{THINK_END}")
    # Thinking: only the last user turn opens <think>; earlier reasoning is dropped.
    assert fmt.render(msgs, {"thinking": True}) == (
        f"{BOS}Be brief.{USER}hello{ASSISTANT}{THINK_END}Hi!{EOS}{USER}1+1=?{ASSISTANT}{THINK_START}")
    assert fmt.render(msgs, {"enable_thinking": True}).endswith(THINK_START)
    assert fmt.render(msgs[1:2], None) == f"{BOS}{USER}hello{ASSISTANT}{THINK_END}"


def test_deepseek_v32_encoding_edge_cases():
    fmt = ChatFormatter()
    # system messages go first wherever they appear; a trailing assistant message is continued (no EOS)
    out = fmt.render([Message("user", "a"), Message("system", "S"), Message("assistant", "partial")], None)
    assert out == f"{BOS}S{USER}a{ASSISTANT}{THINK_END}partial"
    # consecutive user turns: only the last one opens the assistant turn
    assert fmt.render([Message("user", "a"), Message("user", "b")], None) == \
        f"{BOS}{USER}a{USER}b{ASSISTANT}{THINK_END}"
    with pytest.raises(ChatTemplateError):
        fmt.render([Message("system", "only system")], None)
    with pytest.raises(ChatTemplateError):
        fmt.render([Message("user", "x")], {"thinking": "yes"})


def test_jinja_template_from_tokenizer_config(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% if thinking %}<think>{% endif %}{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    fmt = ChatFormatter.from_model_path(str(tmp_path))
    assert fmt.template == template
    msgs = [Message("system", "S"), Message("user", "hi")]
    assert fmt.render(msgs, None) == "<s>[system]S[user]hi[assistant]"
    assert fmt.render(msgs, {"thinking": True}) == "<s>[system]S[user]hi[assistant]<think>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ raise_exception('no system role') }}"}))
    with pytest.raises(ChatTemplateError, match="no system role"):
        ChatFormatter.from_model_path(str(tmp_path)).render(msgs, None)


def test_no_tokenizer_config_uses_builtin(tmp_path):
    assert ChatFormatter.from_model_path(str(tmp_path)).template is None


# -- detokenization and stop strings --------------------------------------------------------------------
@pytest.fixture(scope="module")
def byte_tokenizer():
    from tokenizers import Tokenizer

    from dcpserve.loader.tiny import TINY_SPECIALS, byte_tokenizer_json

    return Tokenizer.from_str(byte_tokenizer_json(512, TINY_SPECIALS))


def test_incremental_detokenizer_holds_partial_utf8(byte_tokenizer):
    text = "aé✓日本x"
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span several tokens
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é is held back


def test_incremental_detokenizer_skips_special_and_unknown_ids(byte_tokenizer):
    ids = byte_tokenizer.encode("ab").ids
    detok = IncrementalDetokenizer(byte_tokenizer)
    assert detok.add([ids[0], 1, 400]) == "a"  # EOS (special) and an id past the tokenizer vocab add no text
    assert detok.add([ids[1]]) == "b"


def test_stop_string_truncates_and_holds_back(byte_tokenizer):
    ids = byte_tokenizer.encode("hello STOP world").ids
    proc = OutputProcessor(byte_tokenizer, stop=("STOP",))
    streamed = []
    for i in ids:
        d = proc.process([i], False, None)
        streamed.append(d.text)
        if d.finished:
            break
    assert d.finished and d.finish_reason == "stop" and d.stop_reason == "STOP"
    assert "".join(streamed) == "hello " and proc.text == "hello "
    assert not any("S" in s for s in streamed)  # never showed part of the stop string


def test_stop_string_included_when_asked(byte_tokenizer):
    proc = OutputProcessor(byte_tokenizer, stop=("lo",), include_stop=True)
    text = "".join(proc.process([i], False, None).text for i in byte_tokenizer.encode("hello").ids)
    assert text == "hello"[:5] and proc.finished


def test_eos_text_not_in_output_and_stop_token_reason(byte_tokenizer):
    ids = byte_tokenizer.encode("ok").ids
    proc = OutputProcessor(byte_tokenizer, stop_token_ids=(ids[1],))
    proc.process([ids[0]], False, None)
    d = proc.process([ids[1]], True, "stop")
    assert proc.text == "o" and d.stop_reason == ids[1] and d.finish_reason == "stop"
    assert proc.token_ids == ids


# -- sampling parameters ---------------------------------------------------------------------------------
def params(**kw):
    return openai_params(CompletionRequest(prompt="x", **kw), INFO, 16)


def test_sampling_defaults_and_mapping():
    p, opts = params(temperature=1e-9, top_k=0, seed=-1, stop="END", max_completion_tokens=5)
    assert p.temperature == 0.0 and p.top_k == -1 and p.max_tokens == 5 and opts.stop == ("END",)
    assert 0 <= p.seed < 2 ** 64
    p, _ = params()
    assert p.max_tokens == 16 and p.temperature == 1.0 and p.top_p == 1.0
    assert params(top_k=100_000)[0].top_k == -1


@pytest.mark.parametrize("kw,field", [({"n": 3}, "n"), ({"max_tokens": 0}, "max_tokens"),
                                      ({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                      ({"top_k": -2}, "top_k"), ({"stop": ["a", ""]}, "stop"),
                                      ({"presence_penalty": 0.5}, "presence_penalty")])
def test_sampling_rejections(kw, field):
    with pytest.raises(APIError) as e:
        params(**kw)
    assert e.value.status == 400 and e.value.param == field


# -- metrics ---------------------------------------------------------------------------------------------
def test_metrics_text_format():
    from dcpserve.server.metrics import EngineGauges

    m = ServerMetrics(tp=2, capacity_tokens=1000)
    m.publish(EngineGauges(running=3, waiting=1, kv_usage=0.25, prefix_hit_tokens=10, prefix_queried_tokens=40))
    m.on_first_token(0.05, 7)
    m.on_tokens(5)
    m.on_finish("length", 0.5, 0.02)
    values = parse_metrics(m.render())
    assert values["dcpserve_num_requests_running"] == 3 and values["dcpserve_num_requests_waiting"] == 1
    assert values['dcpserve_kv_cache_usage_perc{rank="0"}'] == 0.25 == values['dcpserve_kv_cache_usage_perc{rank="1"}']
    assert values["dcpserve_prefix_cache_hit_rate"] == 0.25
    assert values["dcpserve_prompt_tokens_total"] == 7 and values["dcpserve_generation_tokens_total"] == 5
    assert values['dcpserve_time_to_first_token_seconds_bucket{le="0.06"}'] == 1
    assert values['dcpserve_time_to_first_token_seconds_bucket{le="0.04"}'] == 0
    assert values['dcpserve_time_per_output_token_seconds_bucket{le="+Inf"}'] == 1
    assert values["dcpserve_e2e_request_latency_seconds_count"] == 1
    assert values['dcpserve_request_success_total{finish_reason="length"}'] == 1


# -- benchmark math --------------------------------------------------------------------------------------
def test_benchmark_metric_definitions():
    ns = argparse.Namespace(dataset_name="random-ids", request_rate=float("inf"), max_concurrency=None,
                            num_prompts=2, random_input_len=10, random_output_len=5, random_range_ratio=1.0, seed=0)
    a = RequestResult(success=True, input_len=10, output_len=5, ttft=0.1, e2e=0.5, itl=[0.1] * 4, chunks=5)
    b = RequestResult(success=True, input_len=10, output_len=3, ttft=0.2, e2e=0.4, itl=[0.1, 0.1], chunks=3)
    failed = RequestResult(error="boom")
    m = summarize(ns, "m", "http://x", [a, b, failed], duration=2.0)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["output_throughput"] == 4.0 and m["input_throughput"] == 10.0 and m["request_throughput"] == 1.0
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    # TPOT = (E2E - TTFT) / (output_len - 1): a = 0.4/4 = 0.1 s, b = 0.2/2 = 0.1 s
    assert m["mean_tpot_ms"] == pytest.approx(100.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["mean_e2e_latency_ms"] == pytest.approx(450.0)


def test_random_lengths_follow_range_ratio():
    import random

    rng = random.Random(0)
    assert draw_lengths(rng, 5, 100, 1.0) == [100] * 5
    lens = draw_lengths(rng, 200, 100, 0.5)
    assert min(lens) >= 50 and max(lens) <= 100 and len(set(lens)) > 10
