"""Block Top-K: the promised count per block, the largest magnitudes, canonical order."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from microadam.compress import block_topk, topk_layout
from microadam.compress.topk import kept_per_block


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 3000),
    block_size=st.integers(1, 700),
    density=st.floats(0.001, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_keeps_largest_magnitudes_and_exact_count(numel, block_size, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g)
    layout = topk_layout(numel, block_size, density)
    idx, vals = block_topk(x, block_size, layout.k_block, layout.k_tail)
    assert idx.dtype == torch.int16 and idx.numel() == layout.k == vals.numel()
    col = 0
    for j in range(layout.num_blocks):
        block = x[j * block_size : (j + 1) * block_size]
        k = layout.k_block if j < layout.num_full else layout.k_tail
        assert k == kept_per_block(block.numel(), density)
        local = idx[col : col + k].long()
        assert torch.all(local[1:] > local[:-1]), "indices ascend within a block"
        assert torch.equal(vals[col : col + k], block[local])
        dropped = torch.ones(block.numel(), dtype=torch.bool)
        dropped[local] = False
        if dropped.any():
            assert block[local].abs().min() >= block[dropped].abs().max()
        col += k
    assert col == layout.k


@pytest.mark.parametrize(
    ("n", "density", "expected"),
    [(100, 0.07, 7), (100, 0.01, 1), (10, 0.01, 1), (4096, 0.01, 41), (3, 1.0, 3), (0, 0.5, 0)],
)
def test_kept_per_block_rounding(n, density, expected):
    # 100 * 0.07 is 7.000000000000001 in binary; the count must still be 7, not 8.
    assert kept_per_block(n, density) == expected


def test_layout_short_tail_and_small_tensor():
    lay = topk_layout(10_000, 4096, 0.01)
    assert (lay.num_full, lay.k_block, lay.tail, lay.k_tail) == (2, 41, 1808, 19)
    assert lay.k == 2 * 41 + 19
    assert lay.columns(0, 1) == (0, 41) and lay.columns(1, 3) == (41, 101)
    small = topk_layout(5, 4096, 0.01)
    assert (small.num_full, small.tail, small.k) == (0, 5, 1)
    official = topk_layout(29056 * 3, 29056, 0.01)
    assert official.k_block == math.ceil(290.56)


def test_ties_keep_the_promised_count():
    x = torch.zeros(64)
    idx, vals = block_topk(x, 16, 3, 0)
    assert idx.numel() == 12 and torch.all(vals == 0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"Invalid block_size: 40000 \(expected"):
        block_topk(torch.zeros(10), 40000, 1, 1)
    with pytest.raises(ValueError, match=r"Invalid x: expected a 1-D tensor"):
        block_topk(torch.zeros(2, 2), 2, 1, 1)
