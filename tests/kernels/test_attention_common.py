"""Host-side helpers of the attention kernels (no triton needed)."""
from dcpserve.kernels._common import choose_num_splits


def test_num_splits_fill_the_gpu_without_oversplitting():
    # batch 128 x 2 head blocks already fills 132 SMs in ~2 waves: no split (no merge pass).
    assert choose_num_splits(128, 2, 131072, 64, 132) == 1
    # batch 32 x 2 head blocks: 2 splits -> 128 programs, one nearly full wave.
    assert choose_num_splits(32, 2, 32768, 64, 132) == 2
    # batch 1: split long contexts wide, but never below min_tokens_per_split keys per split.
    assert 60 <= choose_num_splits(1, 2, 131072, 64, 132) <= 64
    assert choose_num_splits(1, 2, 4096, 64, 132) <= 4096 // 256
    assert choose_num_splits(4, 2, 10, 64, 132) == 1
