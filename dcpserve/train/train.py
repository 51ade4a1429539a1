"""Train the demo model: a small DeepSeek-V3.2 (MLA, lightning indexer, MoE) on the long-context retrieval
task of `task.py`, in DeepSeek-V3.2's three stages:

  1. dense     the whole model (indexer idle) learns the task with full causal attention;
  2. warm-up   the model is frozen; the indexer learns to match the main attention (KL, all positions);
  3. sparse    attention is restricted to the indexer's top-k; the model keeps learning (LM loss) and the
               indexer follows the main attention over its own selection (KL, inputs detached).

Documents mix passkey retrieval (one fact) and key-value retrieval (several facts). Stages are sized by
wall-clock time, so a fixed budget gives a finished model. The shipped default was made on 2 CPU cores:

    python -m dcpserve.train.train --out DIR --device cpu --minutes 30 --max-len 4096 --batch-tokens 4096 --lr 2e-3
    python -m dcpserve.train.train --out DIR --smoke --device cpu   # smoke run (seconds)

DIR gets model.safetensors (bf16), config.json, tokenizer.json and train_log.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dcpserve.config import ModelConfig
from dcpserve.train import task
from dcpserve.train.model import TrainModel

DEMO_CONFIG: dict = {
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "vocab_size": len(task.VOCAB),
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 64,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": True,
    "first_k_dense_replace": 1,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "index_n_heads": 4,
    "index_head_dim": 32,
    "index_topk": 64,
    "bos_token_id": task.TOKEN_ID[task.BOS],
    "eos_token_id": task.TOKEN_ID[task.EOS],
    "pad_token_id": task.TOKEN_ID[task.EOS],
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}

LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]
MAX_QUESTIONS = 16
KL_ROWS = 32  # query rows per sequence in the indexer loss


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T]
    weights: torch.Tensor  # [B, T]: loss weight of predicting ids[:, t] from position t-1
    answer_mask: torch.Tensor  # [B, T] bool: answer tokens
    kl_rows: torch.Tensor  # [B, R] query positions for the indexer loss


@dataclass
class StageLog:
    name: str
    steps: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def make_batch(rng: random.Random, length: int, batch_tokens: int, max_facts: int, device: torch.device,
               other_weight: float = 0.1, single_prob: float = 0.5) -> Batch:
    """Documents of about `length` tokens with up to MAX_QUESTIONS questions each, padded with EOS (weight 0).
    Filler and fact tokens get `other_weight`: they are mostly unpredictable, but predicting the filler's
    grammar trains the look-at-the-previous-tokens heads that retrieval is built from. A document has one
    fact (passkey retrieval) with probability `single_prob`, else 2..max_facts (key-value retrieval)."""
    samples = []
    for _ in range(max(1, batch_tokens // length)):
        nf = 1 if rng.random() < single_prob or max_facts < 2 else rng.randint(2, max_facts)
        nq = min(MAX_QUESTIONS, nf)
        samples.append(task.make_sample(rng, max(length - 13 * nq - 2, 8 * nf), nf, nq))
    t = max(len(s.ids) for s in samples)
    eos = task.TOKEN_ID[task.EOS]
    ids = torch.full((len(samples), t), eos, dtype=torch.long)
    weights = torch.zeros(len(samples), t)
    answers = torch.zeros(len(samples), t, dtype=torch.bool)
    rows = torch.zeros(len(samples), KL_ROWS, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        weights[i, 1:n] = other_weight
        weights[i, s.answer_at] = 1.0
        answers[i, s.answer_at] = True
        # The positions that must retrieve (those predicting answers) plus random ones.
        must = [a - 1 for a in s.answer_at]
        rows[i] = torch.tensor(must + [rng.randrange(1, n) for _ in range(KL_ROWS - len(must))])
    return Batch(ids.to(device), weights.to(device), answers.to(device), rows.to(device))


def lm_loss(logits: torch.Tensor, b: Batch) -> tuple[torch.Tensor, float]:
    """Weighted next-token loss, and accuracy on answer tokens."""
    pred, tgt, w = logits[:, :-1], b.ids[:, 1:], b.weights[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1), reduction="none").view_as(w)
    mask = b.answer_mask[:, 1:]
    acc = (pred.argmax(-1) == tgt)[mask].float().mean().item()
    return (ce * w).sum() / w.sum(), acc


def lr_at(frac: float, peak: float) -> float:
    """Linear warm-up over the first 5%, then cosine to 10% of peak."""
    if frac < 0.05:
        return peak * frac / 0.05
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - 0.05) / 0.95))))


def pick_length(rng: random.Random, frac: float, max_len: int, curriculum: bool) -> int:
    """Dense stage: short documents densely packed with facts and questions for the first half (retrieval
    is learnt there), then every length; later stages draw from all."""
    allowed = [n for n in LENGTHS if n <= max_len]
    if curriculum and frac < 0.5:
        allowed = allowed[:3]
    return rng.choice(allowed)


def run_stage(model: TrainModel, name: str, seconds: float, args, rng: random.Random, device: torch.device) -> StageLog:
    sparse = name == "sparse"
    train_main = name != "warmup"
    for n, p in model.named_parameters():
        p.requires_grad_(train_main if ".indexer." not in n else name != "dense")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    log, t0 = StageLog(name), time.time()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        from tqdm import tqdm

        bar = tqdm(total=int(seconds), desc=f"{name:8s}", unit="s", bar_format="{l_bar}{bar}| {n:.0f}/{total}s {postfix}")
    except ImportError:
        bar = None
    while (elapsed := time.time() - t0) < seconds:
        frac = elapsed / seconds
        for g in opt.param_groups:
            g["lr"] = lr_at(frac, args.lr)
        length = pick_length(rng, frac, args.max_len, curriculum=name == "dense")
        b = make_batch(rng, length, args.batch_tokens, args.max_facts, device, args.other_weight, args.single_prob)
        with autocast:
            logits, aux = model(b.ids, sparse=sparse, kl_rows=None if name == "dense" else b.kl_rows)
            loss, acc = lm_loss(logits, b)
        total = (loss if train_main else 0) + (aux.indexer_kl if name != "dense" else 0)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if train_main and aux.expert_load:
            model.balance_experts(aux.expert_load, args.bias_rate)
        log.steps += 1
        rec = {"step": log.steps, "t": round(elapsed, 1), "len": length, "loss": round(loss.item(), 4),
               "acc": round(acc, 3), "kl": round(aux.indexer_kl.item(), 4)}
        log.history.append(rec)
        if bar is not None:
            bar.n = min(int(elapsed), int(seconds))
            bar.set_postfix(len=length, loss=rec["loss"], acc=rec["acc"], kl=rec["kl"], refresh=False)
            bar.refresh()
        elif log.steps % 20 == 0:
            print(name, rec, flush=True)
    if bar is not None:
        bar.close()
    log.seconds = time.time() - t0
    return log


@torch.no_grad()
def evaluate(model: TrainModel, lengths: list[int], n: int, device: torch.device, facts: int,
             seed: int = 1234) -> dict[int, float]:
    """Answer accuracy with sparse attention (what the engine runs), one question per document."""
    model.eval()
    out = {}
    rng = random.Random(seed)
    for length in lengths:
        hits = 0
        for _ in range(n):
            s = task.make_sample(rng, length, facts, 1)
            ids = torch.tensor([s.ids], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits, _ = model(ids, sparse=True)
            hits += int(logits[0, s.answer_at[0] - 1].argmax().item() == s.ids[s.answer_at[0]])
        out[length] = hits / n
    model.train()
    return out


def save(model: TrainModel, out: str, logs: list[StageLog], evals: dict, args) -> None:
    from dcpserve.loader.tiny import write_checkpoint

    write_checkpoint(out, DEMO_CONFIG, model.checkpoint(torch.bfloat16))
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write(task.tokenizer_json())
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump({"args": vars(args), "stages": [asdict(l) for l in logs], "eval_accuracy": evals}, f)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=7.0, help="total training time (stages 65/10/25%%)")
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--batch-tokens", type=int, default=32768)
    p.add_argument("--max-facts", type=int, default=8)
    p.add_argument("--single-prob", type=float, default=0.5, help="share of one-fact (passkey) documents")
    p.add_argument("--other-weight", type=float, default=0.1, help="loss weight of non-answer tokens")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bias-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-lengths", default="1024,4096,8192")
    p.add_argument("--eval-n", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="seconds-long CPU run at short lengths (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.minutes, args.max_len, args.batch_tokens, args.max_facts = 0.15, 512, 2048, 4
        args.eval_lengths, args.eval_n = "300", 4
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    cfg = ModelConfig.from_dict(DEMO_CONFIG)
    model = TrainModel(cfg).to(device)
    print(f"demo model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}")
    logs = []
    for name, share in (("dense", 0.65), ("warmup", 0.1), ("sparse", 0.25)):
        logs.append(run_stage(model, name, args.minutes * 60 * share, args, rng, device))
        print(f"{name}: {logs[-1].steps} steps in {logs[-1].seconds:.0f}s, last {logs[-1].history[-1] if logs[-1].history else {}}")
    lengths = [int(x) for x in args.eval_lengths.split(",")]
    evals = {f"facts={f}": evaluate(model, lengths, args.eval_n, device, f) for f in (1, 4)}
    print("accuracy (train model, sparse attention):", evals)
    save(model, args.out, logs, evals, args)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
