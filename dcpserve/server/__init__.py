"""OpenAI-compatible HTTP server (docs/SERVING.md).

app.py          FastAPI app, auth, `run_server` (the `serve` command)
engine_loop.py  the one thread that owns the LLMEngine; queues between it and the asyncio handlers
openai_api.py   /v1/completions, /v1/chat/completions, /v1/models
native.py       /generate (token ids in and out, SGLang-style)
serving.py      shared request plumbing: start, stream deltas, abort on disconnect, SSE
protocol.py     pydantic wire models;  sampling.py  request fields -> SamplingParams
chat.py         DeepSeek-V3.2 chat encoding and jinja chat templates
detokenize.py   incremental detokenization and stop strings
metrics.py      Prometheus text format
errors.py       OpenAI-style error bodies (400 instead of FastAPI's 422)
"""
