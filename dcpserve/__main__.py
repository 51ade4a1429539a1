"""Command line: `python -m dcpserve {generate,capacity,serve}`."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from dcpserve.config import ConfigError, EngineArgs


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--input-ids takes comma-separated integers, e.g. 5,17,42") from None


def cmd_generate(ns: argparse.Namespace) -> int:
    from dcpserve.engine.llm import LLM
    from dcpserve.engine.sampler import SamplingParams

    args = EngineArgs.from_cli(ns)
    if ns.input_ids is None and ns.prompt is None:
        ns.prompt = "the code of sini is 97 . the cat sees a red house . question : what is the code of sini ? answer :"
    t0 = time.time()
    with LLM(**vars(args)) as llm:
        prompt = ns.input_ids if ns.input_ids is not None else ns.prompt
        if isinstance(prompt, str) and llm.tokenizer is None:
            raise ConfigError("this checkpoint has no tokenizer.json: use --input-ids")
        params = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.sampling_seed,
                                max_tokens=ns.max_new_tokens, ignore_eos=ns.ignore_eos)
        t1 = time.time()
        out = llm.generate([prompt], params)[0]
        t2 = time.time()
        model_path = llm.args.model_path  # resolved (embedded default or builtin:NAME)
    n = len(out["output_ids"])
    if not ns.json:
        print(f"model: {model_path}  tp={args.tp} dcp={args.dcp} kv={args.kv_cache_dtype}")
        if "text" in out:
            print(f"output text: {out['text']!r}")
        print(f"output ids: {out['output_ids']}")
        print(f"{n} tokens in {t2 - t1:.2f} s ({n / max(t2 - t1, 1e-9):.1f} tok/s); start-up {t1 - t0:.1f} s")
    print(json.dumps({"output_ids": out["output_ids"], "finish_reason": out["finish_reason"]}))
    return 0


def cmd_capacity(ns: argparse.Namespace) -> int:
    import torch

    from dcpserve.engine.llm_engine import load_model_config
    from dcpserve.kv.layout import SlotLayout
    from dcpserve.kv.pool import plan_kv

    args = EngineArgs.from_cli(ns)
    cfg = load_model_config(args)
    dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp8_e4m3": torch.bfloat16}[args.kv_cache_dtype]
    mem = int((args.kv_mem_gb or 40) * 1e9)
    rows = []
    for d in ns.dcp_list:
        a = EngineArgs(**{**vars(args), "dcp": d})
        a.validate(cfg)
        for mode in (["sharded", "replicated"] if cfg.has_indexer and ns.both_indexer_modes else [args.dcp_indexer]):
            plan = plan_kv(cfg, SlotLayout(args.page_size, d, args.dcp_interleave), cfg.num_hidden_layers,
                           args.kv_cache_dtype, dtype, mode, mem)
            rows.append({"tp": args.tp, "dcp": d, "indexer": mode if cfg.has_indexer else None,
                         "kv_cache_dtype": args.kv_cache_dtype, "tokens": plan.tokens, "pages": plan.num_pages,
                         "bytes_per_token_per_layer_per_rank": round(plan.latent_bytes_per_token_per_rank
                                                                     + plan.index_bytes_per_token_per_rank, 2)})
    base = {r["indexer"]: r["tokens"] for r in rows if r["dcp"] == 1}
    for r in rows:
        r["gain_vs_dcp1"] = round(r["tokens"] / base[r["indexer"]], 3) if base.get(r["indexer"]) else None
    if ns.json:
        print(json.dumps({"rows": rows}))
    else:
        print(f"KV capacity per configuration, {args.kv_mem_gb or 40} GB of KV per rank, {cfg.num_hidden_layers} layers")
        print(f"{'tp':>3} {'dcp':>4} {'indexer':>10} {'B/token/layer/rank':>19} {'tokens':>14} {'gain':>6}")
        for r in rows:
            print(f"{r['tp']:>3} {r['dcp']:>4} {str(r['indexer']):>10} {r['bytes_per_token_per_layer_per_rank']:>19} "
                  f"{r['tokens']:>14,} {r['gain_vs_dcp1']:>6}")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from dcpserve.server.app import run_server

    return run_server(EngineArgs.from_cli(ns))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcpserve", description="DeepSeek MLA inference with decode context parallelism")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate tokens offline for one prompt")
    EngineArgs.add_cli_args(g)
    g.add_argument("--input-ids", type=_ids, default=None, help="comma-separated prompt token ids")
    g.add_argument("--prompt", default=None, help="prompt text (needs tokenizer.json)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print only the JSON result line")
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("capacity", help="KV capacity in tokens per DCP size (same math the engine allocates with)")
    EngineArgs.add_cli_args(c, skip=("dcp",))
    c.add_argument("--dcp", dest="dcp_list", type=_ids, default=[1], help="comma-separated DCP sizes")
    c.add_argument("--both-indexer-modes", action="store_true", help="rows for sharded and replicated indexer")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_capacity)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    EngineArgs.add_cli_args(s)
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    ns = build_parser().parse_args(argv)
    try:
        return ns.fn(ns)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI prints one line, not a traceback
        from dcpserve.distributed.launcher import EngineDeadError

        if isinstance(e, EngineDeadError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
