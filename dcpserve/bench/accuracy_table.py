"""Accuracy per DCP size and context length: for each --dcp it starts one server, runs the accuracy
evaluation (dcpserve/bench/accuracy.py) at every --contexts length, stops the server, and prints a markdown
table plus whether the per-question predictions are identical across DCP sizes (they should be: DCP only
changes where the KV lives, not what the model computes, up to floating-point reduction order).

    python -m dcpserve.bench.accuracy_table --tp 4 --dcp 1,2,4 --contexts 1024,4096,8192 --num-questions 50 \\
        --num-facts 16 [--model-path DIR] [--device cpu] [--extra-server-args "..."] --output-file table.json

Each server runs `python -m dcpserve serve --tp T --dcp D --context-length max(contexts)+64` (room for the
question and the answer; context lengths count words, one token each with the task's tokenizer); its log
goes to --log-dir and its tail is printed if it fails. The questions of a context length come from seed
`--seed + context_len`, the same for every DCP size.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dcpserve.bench.accuracy import EvalError, run_eval, warnings_for
from dcpserve.distributed.launcher import free_port

CONTEXT_MARGIN = 64  # question (11 words) + the last filler sentence's overshoot + BOS + answer tokens
DEFAULT_START_TIMEOUT_S = 600.0  # CPU starts in ~10-20 s; a GPU start loads weights and captures graphs
STOP_TIMEOUT_S = 60.0


class ServerFailed(RuntimeError):
    """The server exited (at start-up or later) or never became healthy; the message carries its log tail."""



def parse_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# ---------------------------------------------------------------------------------------------- server
class Server:
    """`python -m dcpserve serve` in its own session (so a forced stop also takes its rank processes)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path):
        self.cmd = cmd
        self.port = port
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stop() closes it
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with code {self.proc.returncode} during start-up "
                                       f"(log {self.log_path}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise ServerFailed(f"server not healthy after {timeout_s:.0f} s (log {self.log_path}):\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (the server shuts its ranks down cleanly), then SIGKILL to the whole session."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server (pid {self.proc.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s: killing it",
                      file=sys.stderr)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # ranks left behind by a forced or failed exit
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._log.close()


def server_command(args: argparse.Namespace, dcp: int, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "dcpserve", "serve", "--tp", str(args.tp), "--dcp", str(dcp), "--port", str(port),
           "--context-length", str(max(args.contexts) + CONTEXT_MARGIN)]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    if args.device:
        cmd += ["--device", args.device]
    return cmd + shlex.split(args.extra_server_args)


# ---------------------------------------------------------------------------------------------- sweep
def run_seed(seed: int, context_len: int) -> int:
    """The same for every DCP size (same questions); different per context length (independent facts)."""
    return seed + context_len


def evaluate_dcp(args: argparse.Namespace, dcp: int, log_dir: Path, results: dict[int, dict[str, Any]]) -> None:
    """Start one server of this DCP size, run every context length on it (filling `results` as they finish,
    so a server that dies later keeps the rows it completed), stop it."""
    port = free_port()
    srv = Server(server_command(args, dcp, port), port, log_dir / f"server-dcp{dcp}.log")
    print(f"[dcp={dcp}] starting: {shlex.join(srv.cmd)}", flush=True)
    try:
        t0 = time.time()
        srv.wait_healthy(args.start_timeout)
        print(f"[dcp={dcp}] healthy after {time.time() - t0:.1f} s", flush=True)
        for ctx in args.contexts:
            m = run_eval(srv.base_url, args.num_questions, ctx, args.num_facts, args.parallel, run_seed(args.seed, ctx),
                         disable_tqdm=args.disable_tqdm)
            results[ctx] = m
            print(f"[dcp={dcp}] context {ctx}: accuracy {m['accuracy']:.3f}, invalid {m['invalid_rate']:.3f}, "
                  f"errors {m['num_errors']}, prompt tokens {m['prompt_tokens_mean']:.0f}, "
                  f"p50 latency {m['latency_p50_s']:.2f} s", flush=True)
            if not srv.alive():
                raise ServerFailed(f"server exited with code {srv.proc.returncode} during the evaluation "
                                       f"(log {srv.log_path}):\n{srv.log_tail()}")
            for w in warnings_for(m):
                print(f"[dcp={dcp}] warning: {w}", file=sys.stderr)
    finally:
        srv.stop()


def compare_predictions(runs: dict[int, dict[int, dict[str, Any]]], ctx: int) -> dict[str, Any]:
    """Per-question predictions of every DCP size that ran this context; a failed request counts as differing."""
    per_dcp = {d: [r["prediction"] for r in res[ctx]["records"]] for d, res in runs.items() if ctx in res}
    if len(per_dcp) < 2:
        return {"dcp_sizes": sorted(per_dcp), "identical": None, "num_differ": None}
    columns = list(zip(*per_dcp.values()))
    differ = [i for i, preds in enumerate(columns) if None in preds or len(set(preds)) > 1]
    return {"dcp_sizes": sorted(per_dcp), "identical": not differ, "num_differ": len(differ),
            "differing_questions": differ}


def markdown_table(args: argparse.Namespace, runs: dict[int, dict[int, dict[str, Any]]],
                   same: dict[int, dict[str, Any]]) -> str:
    head = ["context"] + [f"dcp={d}" for d in args.dcp] + ["identical"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ctx in args.contexts:
        cells = [str(ctx)]
        for d in args.dcp:
            m = runs.get(d, {}).get(ctx)
            cells.append("failed" if m is None else f"{m['accuracy']:.3f} ({m['num_correct']}/{m['num_questions']})")
        s = same[ctx]
        cells.append("n/a" if s["identical"] is None else
                     "yes" if s["identical"] else f"no ({s['num_differ']}/{args.num_questions} differ)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dcpserve.bench.accuracy_table",
                                description="Retrieval accuracy per DCP size and context length "
                                            "(one server per DCP size).")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--dcp", type=parse_ints, default=[1, 2, 4], help="comma-separated DCP sizes (each divides --tp)")
    p.add_argument("--contexts", type=parse_ints, default=[1024, 4096, 8192],
                   help="comma-separated context lengths in words")
    p.add_argument("--num-questions", type=int, default=50)
    p.add_argument("--num-facts", type=int, default=16)
    p.add_argument("--parallel", type=int, default=8, help="requests in flight at once")
    p.add_argument("--seed", type=int, default=0, help="questions of context C use seed + C")
    p.add_argument("--model-path", default=None, help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--device", default=None, help="passed to the server (auto, cpu, cuda)")
    p.add_argument("--extra-server-args", default="",
                   help="more `serve` flags, one shell-quoted string; they come last, so they override ours "
                        "(e.g. --context-length for a tokenizer with more tokens than words)")
    p.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, help="seconds to wait for /health")
    p.add_argument("--log-dir", default=None, help="server logs (default: a new temporary directory)")
    p.add_argument("--output-file", default=None, help="write the table, per-run metrics and records as JSON")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def validate(args: argparse.Namespace) -> None:
    args.dcp = list(dict.fromkeys(args.dcp))  # a repeated size would overwrite its own results
    args.contexts = list(dict.fromkeys(args.contexts))
    bad = [d for d in args.dcp if args.tp % d]
    if bad:
        raise SystemExit(f"error: every --dcp must divide --tp {args.tp} (not {', '.join(map(str, bad))})")
    if args.num_questions < 1 or args.parallel < 1:
        raise SystemExit("error: --num-questions and --parallel must be >= 1")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dcpserve-accuracy-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"server logs: {log_dir}")
    runs: dict[int, dict[int, dict[str, Any]]] = {}
    failures: dict[int, str] = {}
    for d in args.dcp:
        runs[d] = {}
        try:
            evaluate_dcp(args, d, log_dir, runs[d])
        except (ServerFailed, EvalError) as e:
            failures[d] = str(e)
            print(f"[dcp={d}] failed: {e}", file=sys.stderr)
    same = {ctx: compare_predictions(runs, ctx) for ctx in args.contexts}
    table = markdown_table(args, runs, same)
    print()
    print(table)
    verdicts = [s["identical"] for s in same.values() if s["identical"] is not None]
    if verdicts:
        print(f"\npredictions identical across DCP sizes: {'yes' if all(verdicts) else 'no'}")
    if args.output_file:
        out = {"args": vars(args), "table": table, "failures": {str(d): e for d, e in failures.items()},
               "identical": {str(c): s for c, s in same.items()},
               "runs": {str(d): {str(c): m for c, m in res.items()} for d, res in runs.items()}}
        with open(args.output_file, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.output_file}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
