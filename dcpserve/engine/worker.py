"""One rank: a process that owns a model shard and a KV pool, and runs the step plans the driver sends.

Control travels over a multiprocessing pipe per rank (the driver never joins torch.distributed); tensors
travel over torch.distributed (gloo on CPU, NCCL on CUDA). Rank 0 samples and returns the tokens.
"""
from __future__ import annotations

import cProfile
import ctypes
import importlib.util
import os
import pstats
import signal
import time
import traceback
from dataclasses import dataclass, field

import torch

from dcpserve.attention.backend import get_backend
from dcpserve.config import ConfigError, EngineArgs, ModelConfig, resolve_device, triton_fits
from dcpserve.distributed.p2p import P2P_MAX_BATCH, PeerComm, p2p_available, plan_regions
from dcpserve.distributed.parallel import ParallelState, destroy_parallel, init_parallel
from dcpserve.engine.forward_batch import BlockTables, StepPlan, build_forward_batch
from dcpserve.engine.sampler import SampleSpec, Sampler
from dcpserve.kv.layout import SlotLayout
from dcpserve.kv.pool import KVPool, plan_kv
from dcpserve.loader.reader import DummyReader, Reader, SafetensorsReader
from dcpserve.model.deepseek import DeepseekForCausalLM
from dcpserve.model.mla import AttnRuntime
from dcpserve.model.rope import RotaryEmbedding

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class WorkerInfo:
    num_pages: int
    tokens: int
    load_s: float
    device: str
    attention_backend: str
    dcp_comm: str
    weight_gb: float = 0.0  # this rank's weights (fp8 layer matrices count 1 byte per element)
    fp8_weights: int = 0  # how many layer matrices (experts stacked per layer) stay e4m3


@dataclass
class StepRequest:
    """One step for every rank, or (plan None) a flush: answer the held step now.

    `hold`: the driver sends the next decode step before it waits for this one's tokens (overlap
    scheduling). Each rank then launches this step, keeps its sampled tokens on the device (broadcast from
    rank 0, where they are sampled) for the next step's `plan.prev_rows`, and answers only after it has
    launched that next step, so the host work of step N+1 runs while the GPU computes step N."""

    plan: StepPlan | None
    samples: list[SampleSpec | None] = field(default_factory=list)  # per sequence; None: no token wanted
    want_logits: bool = False
    forget: tuple[str, ...] = ()  # finished requests whose generators rank 0 may drop
    hold: bool = False


FLUSH = StepRequest(None)


@dataclass
class Launched:
    """A step whose kernels are queued. On rank 0 its tokens (and logits, when wanted) are on their way to
    host memory; `ModelRunner.finish` waits for exactly that copy."""

    rows: list[int]  # sequences that sample a token
    num_seqs: int
    tokens: torch.Tensor | None = None  # host
    logits: torch.Tensor | None = None  # host
    ready: torch.cuda.Event | None = None  # recorded after the copies (CUDA only)


def resolve_attention_backend(args: EngineArgs, cfg: ModelConfig, device: str) -> str:
    """auto: the Triton kernels on CUDA (what CUDA graphs capture), when Triton is installed and the model's
    dims fit them; the torch reference otherwise (CPU, where Triton would only run in its interpreter)."""
    if args.attention_backend != "auto":
        return args.attention_backend
    if device != "cuda" or not triton_fits(cfg) or importlib.util.find_spec("triton") is None:
        return "torch"
    return "triton"


def resolve_dtype(args: EngineArgs, cfg: ModelConfig, device: str) -> torch.dtype:
    if args.dtype != "auto":
        return DTYPES[args.dtype]
    if device == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slow and imprecise
    return DTYPES.get(cfg.torch_dtype, torch.bfloat16) if cfg.torch_dtype != "float32" else torch.bfloat16


def make_reader(args: EngineArgs, cfg: ModelConfig, dtype: torch.dtype, dev: torch.device) -> Reader:
    """--quantization auto keeps a checkpoint's own format (fp8 for DeepSeek's checkpoints, which do not fit
    one 8-GPU server in bf16) and leaves dummy weights in full precision; fp8 block-quantizes full-precision
    (and dummy) weights at load, like a real checkpoint; none dequantizes fp8 checkpoints."""
    keep = args.quantization != "none"
    quantize = args.quantization == "fp8"
    if args.load_format == "dummy":
        return DummyReader(dtype, dev, args.seed, quantize=quantize, block=cfg.quant_block)
    return SafetensorsReader(args.model_path, dtype, dev, cfg.quant_block, keep_fp8=keep, quantize=quantize)


class ModelRunner:
    def __init__(self, args: EngineArgs, cfg: ModelConfig, ps: ParallelState):
        self.args, self.cfg, self.ps = args, cfg, ps
        dev = ps.device
        self.dtype = resolve_dtype(args, cfg, dev.type)
        self.backend = resolve_attention_backend(args, cfg, dev.type)
        t0 = time.time()
        torch.manual_seed(args.seed)
        with torch.device(dev):
            self.model = DeepseekForCausalLM(cfg, ps)
        reader = make_reader(args, cfg, self.dtype, dev)
        self.model.load(reader)
        self.load_s = time.time() - t0
        self.layout = SlotLayout(args.page_size, ps.dcp_size, args.dcp_interleave)
        plan = plan_kv(cfg, self.layout, cfg.num_hidden_layers, args.kv_cache_dtype, self.dtype, args.dcp_indexer,
                       self._kv_budget())
        num_pages = self._agree_min(plan.num_pages)
        self.pool = KVPool(cfg, self.layout, num_pages, cfg.num_hidden_layers, args.kv_cache_dtype, self.dtype,
                           args.dcp_indexer, dev)
        self.dcp_comm = self._resolve_dcp_comm()
        self.info = WorkerInfo(num_pages, num_pages * self.layout.global_page_slots, self.load_s, str(dev),
                               self.backend, self.dcp_comm, *self._weight_stats())
        max_pos = max(cfg.max_position_embeddings, args.context_length or 0)
        self.rt = AttnRuntime(self.pool, RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim, max_pos, dev, self.dtype),
                              get_backend(self.backend), self.dcp_comm, self._peer_comm())
        if self.backend == "triton":
            self.model.use_triton_kernels(self.rt.rope)
        self.sampler = Sampler(fused=self.backend == "triton")
        self.profiler = StepProfiler.from_env(ps.rank)
        self.graphs = None
        self.prev_tokens: torch.Tensor | None = None  # the held step's sampled tokens (every rank)
        self.tables = BlockTables()  # the scheduler's block tables, kept current by each plan's deltas
        if dev.type == "cuda" and self.backend == "triton" and not args.disable_cuda_graph:
            from dcpserve.engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.rt, self.pool.dummy_row, self.pool.index_dummy_row,
                                       min(args.cuda_graph_max_bs, args.max_running_requests), num_pages)

    def _weight_stats(self) -> tuple[float, int]:
        params = list(self.model.parameters())
        gb = sum(p.numel() * p.element_size() for p in params) / 1e9
        return gb, sum(p.dtype == torch.float8_e4m3fn for p in params)

    def _kv_budget(self) -> int:
        if self.args.kv_mem_gb is not None:
            return int(self.args.kv_mem_gb * 1e9)
        if self.ps.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.ps.device)
            used = total - free
            return max(int(total * self.args.mem_fraction_static) - used, 0)
        return int(0.5e9)

    def _resolve_dcp_comm(self) -> str:
        """auto: p2p where every rank of the group can map its peers' memory (agreed by all ranks, since a
        group must use one kind of collective), else a2a."""
        asked = self.args.dcp_comm
        if self.ps.dcp_size == 1:
            return asked if asked in ("a2a", "ag_rs") else "a2a"  # nothing is exchanged
        why = p2p_available(self.ps)
        everywhere = self._agree_min(int(why is None)) == 1
        if asked == "auto":
            return "p2p" if everywhere else "a2a"
        if asked == "p2p" and not everywhere:
            raise ConfigError(f"--dcp-comm p2p is unavailable here ({why or 'a peer rank cannot use it'}): "
                              "use --dcp-comm a2a")
        return asked

    def _peer_comm(self) -> PeerComm | None:
        if self.dcp_comm != "p2p":
            return None
        cfg = self.cfg
        regions = plan_regions(min(P2P_MAX_BATCH, self.args.max_running_requests),
                               cfg.num_attention_heads // self.ps.tp_size, self.ps.dcp_size,
                               cfg.kv_lora_rank + cfg.qk_rope_head_dim, self.dtype.itemsize, cfg.index_topk or 0,
                               cfg.kv_lora_rank)
        return PeerComm(self.ps, regions)

    def _agree_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.ps.cpu_group)
        return int(t.item())

    def launch(self, req: StepRequest) -> Launched:
        """Queue the step's forward and sampling on the device; nothing here waits for the GPU."""
        plan = req.plan
        if self.profiler is not None:
            self.profiler.tick(plan.is_decode)
        for rid in req.forget:
            self.sampler.forget(rid)
        fb = build_forward_batch(plan, self.layout, self.ps.dcp_rank, self.pool.dummy_row,
                                 self.pool.index_dummy_row, self.pool.indexer_replicated, self.ps.device,
                                 self.prev_tokens, self.tables)
        if self.graphs is not None and self.graphs.can_run(fb):
            logits = self.graphs.run(fb)
        else:
            logits = self.model(fb, self.rt)
        rows = [i for i, s in enumerate(req.samples) if s is not None]
        tokens = None
        if self.ps.rank == 0 and rows:
            # Indexing with a list would copy it to the device and wait there; decode samples every row.
            picked = logits if len(rows) == len(req.samples) else logits[rows]
            tokens = self.sampler.sample(picked, [req.samples[i] for i in rows])
        if req.hold:
            if self.ps.rank != 0:
                tokens = torch.empty(len(rows), dtype=torch.long, device=self.ps.device)
            if self.ps.tp_size > 1:
                torch.distributed.broadcast(tokens, src=0, group=self.ps.tp_group)
            self.prev_tokens = tokens
        if self.ps.rank != 0 or tokens is None:
            return Launched(rows, len(req.samples))
        return self._copy_out(Launched(rows, len(req.samples)), tokens, logits if req.want_logits else None)

    def _copy_out(self, step: Launched, tokens: torch.Tensor, logits: torch.Tensor | None) -> Launched:
        # Queue the device-to-host copies now, behind this step's sampling: a blocking `.tolist()` later
        # would also wait for the step launched after this one (same stream) and undo the overlap. Copying
        # the logits now also reads them before the next graph replay overwrites its static output.
        if tokens.device.type != "cuda":
            step.tokens, step.logits = tokens, logits
            return step
        step.tokens = _pinned_copy(tokens)
        if logits is not None:
            step.logits = _pinned_copy(logits)
        step.ready = torch.cuda.Event()
        step.ready.record()
        return step

    @staticmethod
    def finish(step: Launched) -> tuple[list[int | None], torch.Tensor | None]:
        """Wait for a launched step's tokens; one per sequence (None where none was sampled)."""
        if step.ready is not None:
            step.ready.synchronize()
        out: list[int | None] = [None] * step.num_seqs
        if step.tokens is not None:
            for i, t in zip(step.rows, step.tokens.tolist()):
                out[i] = t
        return out, step.logits


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor, queued on the stream (valid once an event recorded after it fires)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class StepProfiler:
    """DCPSERVE_PROFILE_DIR=dir: rank 0 records steps [START, STOP) of one phase with torch.profiler and
    writes the per-kernel table (sorted by device time) there, a Chrome trace (chrome://tracing, Perfetto)
    of the same steps, and a cProfile of their host-side Python (where the rank spends time between kernels).
    DCPSERVE_PROFILE_PHASE=decode (default: decode steps [20, 30)) or prefill (prefill steps [5, 9): past
    bench.engine's warm-up, inside its --ttft-repeats); DCPSERVE_PROFILE_STEPS=START:STOP overrides the
    window. For finding where a step's time goes, not for timing."""

    WINDOWS = {"decode": (20, 30), "prefill": (5, 9)}

    def __init__(self, out_dir: str, phase: str = "decode", window: tuple[int, int] | None = None):
        if phase not in self.WINDOWS:
            raise ValueError(f"DCPSERVE_PROFILE_PHASE must be one of {', '.join(self.WINDOWS)}, not {phase!r}")
        self.out_dir, self.phase, self.seen, self.prof = out_dir, phase, 0, None
        self.START, self.STOP = window or self.WINDOWS[phase]
        self.host: cProfile.Profile | None = None

    @classmethod
    def from_env(cls, rank: int) -> "StepProfiler | None":
        d = os.environ.get("DCPSERVE_PROFILE_DIR")
        if not d or rank != 0:
            return None
        steps = os.environ.get("DCPSERVE_PROFILE_STEPS")
        window = tuple(int(x) for x in steps.split(":")) if steps else None
        return cls(d, os.environ.get("DCPSERVE_PROFILE_PHASE", "decode"), window)

    def tick(self, is_decode: bool) -> None:
        if is_decode != (self.phase == "decode"):
            return
        if self.seen == self.START:
            acts = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.host = cProfile.Profile()
            self.host.enable()
        elif self.seen == self.STOP and self.prof is not None:
            self.host.disable()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            os.makedirs(self.out_dir, exist_ok=True)
            path = os.path.join(self.out_dir, f"profile_{os.getpid()}.txt")
            with open(path, "w") as f:
                f.write(self._summary() + "\n")
                f.write(self.prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=60))
            self.prof.export_chrome_trace(os.path.join(self.out_dir, f"trace_{os.getpid()}.json"))
            with open(os.path.join(self.out_dir, f"host_{os.getpid()}.txt"), "w") as f:
                pstats.Stats(self.host, stream=f).sort_stats("cumulative").print_stats(60)
            self.prof = self.host = None
        self.seen += 1

    def _summary(self) -> str:
        """Kernels and summed kernel time per step (graph replays included: CUPTI records their kernels), then
        where the GPU sat idle between kernels (`idle_gaps`)."""
        steps = self.STOP - self.START
        kernels = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        head = (f"per {self.phase} step: {len(kernels) / steps:.0f} kernels, {busy_us / steps:.0f} us of kernel time "
                f"(averaged over {steps} steps)")
        if not kernels:
            return head
        return head + "\n" + idle_gaps([(e.time_range.start, e.time_range.end, e.name) for e in kernels])


def idle_gaps(kernels: list[tuple[float, float, str]], top: int = 8) -> str:
    """GPU timeline of (start_us, end_us, name) kernels, any streams: the span, the time no kernel ran, and the
    longest idle gaps with the kernel each one ends at. Idle time inside a step is where the GPU waited for
    the host (launches, syncs, ranks meeting at a collective): the kernel table alone cannot show it."""
    kernels = sorted(kernels)
    end, idle, gaps = kernels[0][0], 0.0, []
    for start, stop, name in kernels:
        if start > end:
            idle += start - end
            gaps.append((start - end, start - kernels[0][0], name))
        end = max(end, stop)
    span = end - kernels[0][0]
    lines = [(f"GPU span {span / 1e3:.2f} ms, idle {idle / 1e3:.2f} ms ({100 * idle / max(span, 1e-9):.0f}%); "
              "longest gaps (us, at ms, before kernel):")]
    lines += [f"  {g:9.1f}  {at / 1e3:8.2f}  {name[:70]}" for g, at, name in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)


def _die_with_parent() -> None:
    # If the driver is killed outright, take this rank down too: no orphan processes.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def worker_main(rank: int, args: EngineArgs, cfg: ModelConfig, init_method: str, conn) -> None:
    _die_with_parent()
    try:
        device = resolve_device(args.device)
        # On CUDA the host only builds small metadata tensors, where waking a wide OpenMP pool costs
        # milliseconds per op; on CPU the ranks share the cores for the model itself.
        torch.set_num_threads(4 if device == "cuda" else max(1, (os.cpu_count() or 1) // args.tp))
        dev = torch.device(f"cuda:{rank}") if device == "cuda" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        ps = init_parallel(rank, args.tp, args.dcp, dev, init_method, args.dist_timeout_s)
        runner = ModelRunner(args, cfg, ps)
        conn.send(("ready", runner.info))
        held: Launched | None = None
        while True:
            req = conn.recv()
            if req is None:
                break
            launched = runner.launch(req) if req.plan is not None else None
            for step in (held, None if req.hold else launched):
                if step is not None and rank == 0:
                    conn.send(("ok", *runner.finish(step)))
            held = launched if req.hold else None
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception as e:  # report, then exit: the driver tears the group down
        msg = f"{type(e).__name__}: {e}"
        try:
            conn.send(("error", msg, traceback.format_exc()))
        except Exception:
            pass
        os._exit(1)
    destroy_parallel()
