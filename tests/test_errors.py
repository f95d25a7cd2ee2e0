"""Bad input raises the exception type torch's SDPA raises, with a message that names the argument."""

from __future__ import annotations

import pytest
import torch

from noflash_core import scaled_dot_product_attention as sdpa
from tests.support.reference import math_sdpa

q = torch.randn(2, 4, 8, 16)
k = torch.randn(2, 4, 10, 16)
v = torch.randn(2, 4, 10, 16)

CASES = {
    "mask_and_causal": ((q, k, v), dict(attn_mask=torch.ones(8, 10, dtype=torch.bool), is_causal=True), "is_causal"),
    "mask_not_broadcast": ((q, k, v), dict(attn_mask=torch.ones(8, 11, dtype=torch.bool)), "attn_mask"),
    "mask_too_many_dims": ((q, k, v), dict(attn_mask=torch.ones(1, 2, 4, 8, 10, dtype=torch.bool)), "attn_mask"),
    "dtype_mismatch": ((q, k.double(), v), {}, "dtype"),
    "float_mask_dtype": ((q, k, v), dict(attn_mask=torch.zeros(8, 10, dtype=torch.float64)), "attn_mask"),
    "int_mask": ((q, k, v), dict(attn_mask=torch.zeros(8, 10, dtype=torch.int32)), "attn_mask"),
    "heads_without_gqa": ((q, k[:, :2], v[:, :2]), {}, "head"),
    "gqa_not_dividing": ((q, k[:, :3], v[:, :3]), dict(enable_gqa=True), "heads"),
    "embed_dim_mismatch": ((q, k[..., :8], v), {}, "last dim"),
    "seq_len_mismatch": ((q, k, v[:, :, :9]), {}, "sequence length"),
    "batch_mismatch": ((q, k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)), {}, "batch"),
    "one_dimensional": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}, "2-D"),
    "integer_inputs": ((q.int(), k.int(), v.int()), {}, "dtype"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("tier", ["auto", 1, 2, 3])
def test_same_exception_type_as_torch(name, tier):
    args, kwargs, words = CASES[name]
    with pytest.raises(Exception) as theirs:
        math_sdpa(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        sdpa(*args, tier=tier, **kwargs)
    assert type(ours.value) is type(theirs.value), (type(ours.value), type(theirs.value))
    assert words.lower() in str(ours.value).lower()


def test_invalid_tier_and_blocks():
    with pytest.raises(ValueError, match="tier"):
        sdpa(q, k, v, tier=4)
    with pytest.raises(ValueError, match="block_m"):
        sdpa(q, k, v, block_m=0)
    with pytest.raises(ValueError, match="block_n"):
        sdpa(q, k, v, block_n=-3)


def test_tier3_refuses_grad():
    qq = q.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        sdpa(qq, k, v, tier=3)
    with torch.no_grad():
        sdpa(qq, k, v, tier=3)  # fine without grad


def test_auto_never_picks_tier3_under_grad():
    from noflash_core import plan

    big = torch.randn(1, 4, 2048, 64, requires_grad=True)
    for budget in (2**20, 2**24, 2**28, 2**32):
        assert plan(big, big, big, budget_bytes=budget).tier in (1, 2)
