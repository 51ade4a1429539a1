import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Before any test module imports a kernel: Triton decides interpreted vs compiled when a module's
    # @triton.jit functions are created, so a kernel module imported first without this (e.g. through the
    # engine) would stay compiled-only for every later test in the session.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def hf_refs(tmp_path_factory):
    """Tiny V3.2, V3 and fp8-weight V3.2 checkpoints with transformers' greedy outputs (built once)."""
    pytest.importorskip("transformers")
    from tests.hf_models import make_reference

    root = str(tmp_path_factory.mktemp("hf"))
    return {k: make_reference(k, root) for k in ("v32", "v3", "v32-fp8")}


@pytest.fixture(autouse=True)
def _enough_gpus(request):
    """On a GPU machine, a test parametrized with more ranks (`tp`) than visible GPUs skips: the engine
    runs one rank per GPU. (CPU runs any number of ranks.)"""
    tp = getattr(getattr(request.node, "callspec", None), "params", {}).get("tp")
    if isinstance(tp, int) and torch.cuda.is_available() and torch.cuda.device_count() < tp:
        pytest.skip(f"tp={tp} needs {tp} GPUs (one rank per GPU)")
