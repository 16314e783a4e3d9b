"""Block Top-K: keep the largest magnitudes of every contiguous block of a flat tensor.

MicroAdam (Alg. 1, line 5) sparsifies the error-corrected gradient with Top-K. Running it
per block of ``block_size`` elements instead of over the whole tensor keeps the indices
block-local (so they fit in int16) and makes the work embarrassingly parallel; the last
block of a tensor may be shorter and keeps its own, proportionally rounded, count.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

__all__ = ["TopKLayout", "block_topk", "kept_per_block", "topk_layout"]

MAX_BLOCK_SIZE = 32768  # block-local indices are stored as int16 (0 .. 32767)


@functools.lru_cache(maxsize=1024)  # called at every step, for each tensor
def kept_per_block(n: int, density: float) -> int:
    """ceil(n * density), at least 1 for n >= 1 and at most n.

    The product is rounded to 9 decimals before the ceiling so that, e.g., 100 * 0.07
    (7.000000000000001 in binary floating point) keeps 7 elements, not 8.
    """
    if n <= 0:
        return 0
    return max(1, min(n, math.ceil(round(n * density, 9))))


class TopKLayout(NamedTuple):
    """How a flat tensor of ``numel`` elements is cut into Top-K blocks.

    ``num_full`` blocks of ``block_size`` elements keep ``k_block`` each; a last block of
    ``tail`` elements (0 if none) keeps ``k_tail``. ``k`` is the total kept per step, the
    width of MicroAdam's window. Block ``j`` owns window columns ``[j * k_block, ...)``.
    """

    numel: int
    block_size: int
    num_full: int
    k_block: int
    tail: int
    k_tail: int

    @property
    def k(self) -> int:
        return self.num_full * self.k_block + self.k_tail

    @property
    def num_blocks(self) -> int:
        return self.num_full + (1 if self.tail else 0)

    def columns(self, first_block: int, end_block: int) -> tuple[int, int]:
        """Window columns ``[c0, c1)`` owned by blocks ``first_block .. end_block - 1``."""
        c0 = first_block * self.k_block
        if end_block <= self.num_full:
            return c0, end_block * self.k_block
        return c0, self.num_full * self.k_block + self.k_tail


def topk_layout(numel: int, block_size: int, density: float) -> TopKLayout:
    """The block layout of a flat tensor of ``numel`` elements (see :class:`TopKLayout`)."""
    num_full, tail = divmod(numel, block_size)
    return TopKLayout(
        numel=numel,
        block_size=block_size,
        num_full=num_full,
        k_block=kept_per_block(block_size, density) if num_full else 0,
        tail=tail,
        k_tail=kept_per_block(tail, density),
    )


def block_topk(
    x: torch.Tensor, block_size: int, k_block: int, k_tail: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K by magnitude in every block of the 1-D tensor ``x``.

    ``x`` is cut into consecutive blocks of ``block_size`` elements; a shorter last block
    (``len(x) % block_size`` elements) keeps ``k_tail``, the others ``k_block``.

    Returns ``(indices, values)``, each of length ``num_full * k_block + k_tail``, blocks in
    order: ``indices`` are block-local (int16, ascending within each block, which makes the
    result canonical and the later scatter cache friendly) and ``values = x[indices]`` in
    ``x``'s dtype. Ties may resolve either way, but every kept magnitude is >= every dropped
    magnitude of its block.
    """
    if x.dim() != 1:
        raise ValueError(f"Invalid x: expected a 1-D tensor, got shape {tuple(x.shape)}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"Invalid block_size: {block_size} (expected 1 <= block_size <= 32768)")
    num_full, tail = divmod(x.numel(), block_size)
    idx_parts, val_parts = [], []
    for blocks, k in (
        (x[: num_full * block_size].view(num_full, block_size), k_block),
        (x[num_full * block_size :].view(1 if tail else 0, tail), k_tail),
    ):
        if blocks.numel() == 0:
            continue
        if k == blocks.shape[1]:  # density 1: keep everything, no selection needed
            idx = torch.arange(k, device=x.device).expand(blocks.shape[0], k)
        else:
            mags = blocks.abs()
            if mags.dtype == torch.float32 and mags.device.type == "cpu":
                # Non-negative floats order like their bit patterns, and integer Top-K is
                # about a third faster on the CPU; the kept set is the same.
                mags = mags.view(torch.int32)
            idx = mags.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        idx_parts.append(idx.reshape(-1))
        val_parts.append(blocks.gather(1, idx).reshape(-1))
    if not idx_parts:
        empty = x.new_empty(0)
        return empty.to(torch.int16), empty
    return torch.cat(idx_parts).to(torch.int16), torch.cat(val_parts)
