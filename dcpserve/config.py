"""Model configuration (read from a checkpoint's config.json) and engine arguments (one dataclass, the CLI
is generated from it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v32")


class ConfigError(ValueError):
    """A user-facing configuration problem; its message says what to change."""


def triton_fits(cfg: ModelConfig) -> bool:
    """The Triton attention kernels tile kv_lora_rank and qk_rope_head_dim: powers of two >= 16."""
    return all(x >= 16 and x & (x - 1) == 0 for x in (cfg.kv_lora_rank, cfg.qk_rope_head_dim))


@dataclass
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> RopeConfig:
        # transformers 5 writes `rope_parameters` (with rope_theta inside); official DeepSeek checkpoints
        # write `rope_scaling` (with `type`) and a top-level `rope_theta`.
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"unsupported rope type {rope_type!r}: dcpserve supports 'default' and 'yarn'")
        if rope_type == "default":
            return cls(theta=float(theta))
        factor = params.get("factor")
        orig = params.get("original_max_position_embeddings", 4096)
        if factor is None:
            factor = raw.get("max_position_embeddings", orig) / orig
        return cls(
            theta=float(theta),
            rope_type="yarn",
            factor=float(factor),
            original_max_position_embeddings=int(orig),
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            mscale=float(params.get("mscale") or 0.0),
            mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    torch_dtype: str = "bfloat16"
    quant_block: tuple[int, int] | None = None  # fp8 weight block size when the checkpoint is fp8

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one cached latent row: kv_lora_rank + rope dims (576 for DeepSeek)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.rope.rope_type == "yarn" and self.rope.mscale_all_dim:
            m = yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: dcpserve serves {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        eos = raw.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        qcfg = raw.get("quantization_config") or {}
        quant_block = tuple(qcfg["weight_block_size"]) if qcfg.get("weight_block_size") else None
        is_v32 = model_type == "deepseek_v32"
        try:
            return cls(
                model_type=model_type,
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                moe_intermediate_size=raw.get("moe_intermediate_size", 0),
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=raw["num_attention_heads"],
                q_lora_rank=raw.get("q_lora_rank"),
                kv_lora_rank=raw["kv_lora_rank"],
                qk_nope_head_dim=raw["qk_nope_head_dim"],
                qk_rope_head_dim=raw["qk_rope_head_dim"],
                v_head_dim=raw["v_head_dim"],
                n_routed_experts=raw.get("n_routed_experts") or 0,
                n_shared_experts=raw.get("n_shared_experts") or 0,
                num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
                n_group=raw.get("n_group") or 1,
                topk_group=raw.get("topk_group") or 1,
                routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
                norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
                first_k_dense_replace=raw.get("first_k_dense_replace", 0),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=raw.get("max_position_embeddings", 4096),
                rope=RopeConfig.from_hf(raw),
                rope_interleave=bool(raw.get("rope_interleave", True)),
                index_n_heads=raw.get("index_n_heads", 64) if is_v32 else 0,
                index_head_dim=raw.get("index_head_dim", 128) if is_v32 else 0,
                index_topk=raw.get("index_topk", 2048) if is_v32 else 0,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
                quant_block=quant_block,
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required field {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, model_path: str) -> ModelConfig:
        path = os.path.join(model_path, "config.json")
        if not os.path.isdir(model_path):
            raise ConfigError(f"model path {model_path!r} does not exist or is not a directory")
        if not os.path.isfile(path):
            raise ConfigError(f"no config.json in {model_path!r}: pass a HuggingFace-format checkpoint directory")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)


def resolve_device(device: str) -> str:
    """--device auto: cuda when a GPU is visible, else cpu."""
    if device != "auto":
        return device
    import torch  # only here: the config module itself stays torch-free

    return "cuda" if torch.cuda.is_available() else "cpu"


KV_CACHE_DTYPES = ("auto", "bf16", "fp8_e4m3")
DCP_COMMS = ("auto", "p2p", "a2a", "ag_rs")
DCP_INDEXERS = ("sharded", "replicated")
QUANTIZATIONS = ("auto", "fp8", "none")


@dataclass
class EngineArgs:
    """Every engine/server option. CLI flags are generated from the fields (name -> --name-with-dashes)."""

    model_path: str | None = field(default=None, metadata={"help": "HF-format checkpoint dir (default: embedded tiny model)"})
    tp: int = field(default=1, metadata={"help": "tensor-parallel size (processes)"})
    dcp: int = field(default=1, metadata={"help": "decode-context-parallel size (divides tp)"})
    dcp_comm: str = field(default="auto", metadata={
        "help": "DCP decode collectives: p2p (one kernel each over peer-mapped GPU memory), a2a (NCCL all-to-all "
                "merge), ag_rs (NCCL all-gather + reduce-scatter); auto = p2p on CUDA GPUs with peer access, else a2a",
        "choices": DCP_COMMS})
    dcp_indexer: str = field(default="sharded", metadata={"help": "DSA indexer cache", "choices": DCP_INDEXERS})
    dcp_interleave: int = field(default=1, metadata={"help": "tokens per owner run in the slot layout"})
    page_size: int = field(default=16, metadata={"help": "KV rows per local page (global page = page_size*dcp)"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "KV cache format", "choices": KV_CACHE_DTYPES})
    kv_mem_gb: float | None = field(default=None, metadata={"help": "KV cache memory per rank in GB"})
    mem_fraction_static: float = field(default=0.85, metadata={"help": "fraction of GPU memory for weights+KV"})
    max_running_requests: int = field(default=64, metadata={"help": "max sequences decoding at once"})
    chunked_prefill_size: int = field(default=2048, metadata={"help": "max tokens per prefill step"})
    context_length: int | None = field(default=None, metadata={"help": "max prompt+output tokens"})
    load_format: str = field(default="auto", metadata={"help": "auto or dummy (random weights)", "choices": ("auto", "dummy")})
    num_layers: int | None = field(default=None, metadata={"help": "override layer count (benchmarks)"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, float32, bfloat16, float16"})
    quantization: str = field(default="auto", metadata={
        "help": "layer weights: auto (the checkpoint's own format: DeepSeek's block-fp8 checkpoints stay fp8; "
                "dummy weights full precision), fp8 (block-quantize full-precision or dummy weights at load) or "
                "none (dequantize fp8 checkpoints to --dtype: faster GEMMs at decode batches above ~32-64 and in "
                "prefill, twice the weight memory; see docs/PERF.md)",
        "choices": QUANTIZATIONS})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    attention_backend: str = field(default="auto", metadata={
        "help": "auto (triton on CUDA when the model's dims fit its kernels, else torch), torch or triton",
        "choices": ("auto", "torch", "triton")})
    disable_cuda_graph: bool = field(default=False, metadata={"help": "run decode eagerly on CUDA"})
    cuda_graph_max_bs: int = field(default=128, metadata={"help": "largest decode batch captured in a graph"})
    disable_overlap_schedule: bool = field(default=False, metadata={
        "help": "wait for each decode step's tokens before planning the next (default: plan and send it first)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV of shared prompt prefixes"})
    seed: int = field(default=0, metadata={"help": "seed for dummy weights"})
    dist_timeout_s: int = field(default=120, metadata={"help": "collective/rendezvous timeout"})
    host: str = field(default="127.0.0.1", metadata={"help": "server bind address"})
    port: int = field(default=30000, metadata={"help": "server port"})
    api_key: str | None = field(default=None, metadata={"help": "require this bearer token"})
    served_model_name: str | None = field(default=None, metadata={"help": "model name in the API"})

    def check_devices(self) -> None:
        """Before starting ranks (not part of `validate`: planning commands such as `capacity` may ask about
        more GPUs than this machine has)."""
        if resolve_device(self.device) == "cuda":
            import torch

            if self.tp > (n := torch.cuda.device_count()):
                raise ConfigError(f"--tp {self.tp} runs one rank per GPU, but {n} CUDA GPU(s) are visible: "
                                  f"use --tp {n} or less (or check CUDA_VISIBLE_DEVICES)")

    def validate(self, cfg: ModelConfig | None = None) -> None:
        """Fail fast, with a message that says what to change."""
        if self.tp < 1 or self.dcp < 1:
            raise ConfigError(f"--tp and --dcp must be >= 1 (got tp={self.tp}, dcp={self.dcp})")
        if self.tp % self.dcp != 0:
            raise ConfigError(f"--dcp {self.dcp} must divide --tp {self.tp}: DCP groups are slices of the TP group")
        if self.page_size < 1:
            raise ConfigError("--page-size must be >= 1")
        if self.dcp_interleave < 1 or self.page_size % self.dcp_interleave != 0:
            raise ConfigError(f"--dcp-interleave {self.dcp_interleave} must be >= 1 and divide --page-size {self.page_size}")
        for name, choices in (("dcp_comm", DCP_COMMS), ("dcp_indexer", DCP_INDEXERS), ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("quantization", QUANTIZATIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
        if self.dcp_comm == "p2p" and self.dcp > 1 and resolve_device(self.device) != "cuda":
            raise ConfigError("--dcp-comm p2p needs CUDA GPUs: use --dcp-comm a2a (or auto) on CPU")
        if self.max_running_requests < 1 or self.chunked_prefill_size < 1:
            raise ConfigError("--max-running-requests and --chunked-prefill-size must be >= 1")
        if cfg is None:
            return
        tp = self.tp
        checks = [
            (cfg.num_attention_heads % tp == 0, f"attention heads ({cfg.num_attention_heads}) must be divisible by --tp {tp}"),
            (cfg.vocab_size % tp == 0, f"vocab size ({cfg.vocab_size}) must be divisible by --tp {tp}"),
            (cfg.intermediate_size % tp == 0, f"intermediate_size ({cfg.intermediate_size}) must be divisible by --tp {tp}"),
        ]
        if cfg.n_routed_experts:
            checks.append((cfg.moe_intermediate_size % tp == 0,
                           f"moe_intermediate_size ({cfg.moe_intermediate_size}) must be divisible by --tp {tp}"))
            checks.append((cfg.n_routed_experts % cfg.n_group == 0, "n_routed_experts must be divisible by n_group"))
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        if self.num_layers is not None and not (1 <= self.num_layers):
            raise ConfigError("--num-layers must be >= 1")
        if self.attention_backend == "triton" and not triton_fits(cfg):
            raise ConfigError("--attention-backend triton needs kv_lora_rank and qk_rope_head_dim to be powers of "
                              f"two >= 16 (got {cfg.kv_lora_rank}, {cfg.qk_rope_head_dim}): use --attention-backend torch")

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            helptext = f.metadata.get("help", "")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
                continue
            typ = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
            kwargs: dict[str, Any] = dict(type=typ, default=f.default, help=helptext)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
            parser.add_argument(flag, **kwargs)

    @classmethod
    def from_cli(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})
