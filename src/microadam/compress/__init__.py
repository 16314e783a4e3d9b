"""Pure tensor functions behind MicroAdam and Adapprox: block Top-K, bucket quantization
with 4-bit packing and stochastic rounding, the sliding-window moment statistics, and the
adaptive randomized low-rank factorisation.

Nothing here holds state or knows about ``torch.optim``; every function is tested on its
own (tests/compress) and reused by the optimizer and by the fused kernels' tests.
"""

from microadam.compress.low_rank import adaptive_low_rank, candidate_ranks
from microadam.compress.quant import (
    bucket_range,
    code_levels,
    decode,
    dequantize,
    encode,
    expand_buckets,
    pack_nibbles,
    packed_numel,
    quantize,
    uniform_noise,
    unpack_nibbles,
)
from microadam.compress.topk import TopKLayout, block_topk, topk_layout
from microadam.compress.window import window_ages, window_direction

__all__ = [
    "TopKLayout",
    "adaptive_low_rank",
    "block_topk",
    "bucket_range",
    "candidate_ranks",
    "code_levels",
    "decode",
    "dequantize",
    "encode",
    "expand_buckets",
    "pack_nibbles",
    "packed_numel",
    "quantize",
    "topk_layout",
    "uniform_noise",
    "unpack_nibbles",
    "window_ages",
    "window_direction",
]
