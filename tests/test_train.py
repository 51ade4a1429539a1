"""The demo model's training code: the task and tokenizer agree, the training-form model computes what
transformers' DeepseekV32 computes (dense and top-k sparse), the indexer loss trains the indexer alone, and
a smoke run writes a checkpoint the engine serves with the same greedy answer as the training model."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

from dcpserve.config import ModelConfig
from dcpserve.train import task
from dcpserve.train.model import TrainModel
from tests.hf_models import build_model


def test_tokenizer_encodes_documents_to_the_generator_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(task.tokenizer_json())
    rng = random.Random(3)
    for n in (40, 300, 1500):
        s = task.make_sample(rng, n, rng.randint(1, 12), 3)
        assert tok.encode(s.text).ids == s.ids[:-1]  # BOS added, no EOS
        assert [task.VOCAB[s.ids[a]] for a in s.answer_at] == s.answers
        assert abs(len(s.ids) - n - 13 * len(s.answers)) < 20  # about the requested context length
    text, answer = task.prompt(rng, 200, 5)
    assert text.endswith("answer :") and 0 <= int(answer) < task.NUM_VALUES
    assert len(task.VOCAB) % 64 == 0 and tok.get_vocab_size() == len(task.VOCAB)
    name = task.NAMES[0]
    assert tok.encode(f"The CODE of {name.title()}?").tokens == [task.BOS, "the", "code", "of", name, "?"]
    assert tok.encode("answer", add_special_tokens=False).ids == [task.TOKEN_ID["answer"]]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """transformers' tiny V3.2 (index_topk 16) and the training model loaded from its saved checkpoint."""
    hf = build_model("v32", seed=1)
    path = tmp_path_factory.mktemp("hfv32")
    hf.save_pretrained(path)
    tm = TrainModel(ModelConfig.from_pretrained(str(path)))
    tm.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return hf, tm.eval()


@pytest.mark.parametrize("length", [9, 16, 57])
def test_sparse_forward_matches_transformers(hf_pair, length):
    hf, tm = hf_pair
    ids = torch.randint(2, 250, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        ref = hf(ids).logits
        out, _ = tm(ids, sparse=True)
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 1e-5 * scale, (out - ref).abs().max()


def test_dense_forward_matches_transformers_up_to_topk(hf_pair):
    hf, tm = hf_pair
    ids = torch.randint(2, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        out, _ = tm(ids, sparse=False)
    k = tm.cfg.index_topk  # below k positions the indexer selects everything, so dense == sparse
    assert (out[:, :k] - ref[:, :k]).abs().max() <= 1e-5 * ref.abs().max()
    assert (out[:, k:] - ref[:, k:]).abs().max() > 1e-2 * ref.abs().max()  # selection matters beyond k


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_trains_only_the_indexer(hf_pair, sparse):
    _, tm = hf_pair
    ids = torch.randint(2, 250, (2, 48), generator=torch.Generator().manual_seed(5))
    rows = torch.tensor([[47, 20, 3], [30, 47, 16]])
    tm.zero_grad(set_to_none=True)
    _, aux = tm(ids, sparse=sparse, kl_rows=rows)
    assert torch.isfinite(aux.indexer_kl) and aux.indexer_kl > 0
    aux.indexer_kl.backward()
    for name, p in tm.named_parameters():
        has = p.grad is not None and p.grad.abs().sum() > 0
        if ".indexer." in name and "k_norm" not in name:
            assert has, name
        if ".indexer." not in name:
            assert not has, name
    tm.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_smoke_training_checkpoint_serves_with_the_same_answer(tmp_path):
    from dcpserve.engine.llm import LLM
    from dcpserve.engine.sampler import SamplingParams
    from dcpserve.train.train import main

    out = tmp_path / "demo"
    main(["--out", str(out), "--smoke", "--device", "cpu"])
    cfg = ModelConfig.from_pretrained(str(out))
    tm = TrainModel(cfg)
    tm.load_state_dict({k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()})
    tm.eval()
    rng = random.Random(11)
    prompts = [task.make_sample(rng, n, 4, 1, eos=False).ids for n in (100, 300)]  # 300 > index_topk
    want = []
    with torch.no_grad():
        for p in prompts:
            logits, _ = tm(torch.tensor([p]), sparse=True)
            want.append(int(logits[0, -1].argmax()))
    llm = LLM(model_path=str(out), tp=2, dcp=2, dtype="float32")
    try:
        got = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [g["output_ids"][0] for g in got] == want


@pytest.mark.slow
def test_shipped_model_answers_like_transformers():
    """The embedded default, through the engine at tp=2/dcp=2, gives transformers' greedy answer on the same
    checkpoint, and that answer is the right code."""
    from transformers import AutoModelForCausalLM

    from dcpserve.engine.llm import LLM
    from dcpserve.engine.sampler import SamplingParams
    from dcpserve.loader.tiny import default_model_path

    path = default_model_path()
    rng = random.Random(5)
    samples = [task.make_sample(rng, n, 1, 1, eos=False) for n in (300, 700)]  # both beyond index_topk
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [int(hf(torch.tensor([s.ids])).logits[0, -1].argmax()) for s in samples]
    llm = LLM(tp=2, dcp=2, dtype="float32")
    try:
        got = llm.generate([s.ids for s in samples], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    finally:
        llm.shutdown()
    assert [g["output_ids"][0] for g in got] == want
    assert [task.VOCAB[t] for t in want] == [s.answers[0] for s in samples]
