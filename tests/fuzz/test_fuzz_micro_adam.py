"""Fuzzing MicroAdam (and Adapprox) with random shapes, settings and gradient sequences.

Each example draws one to three parameters (0-d, empty, small, odd, 2-D and now and then
a 1-D tensor of 100 000 elements), float32 or bfloat16, a random configuration (density,
window, Top-K block and bucket sizes, 4 or 8 bits, error feedback on or off, nearest or
stochastic rounding, weight decay, maximize, window value dtype) and a few steps in which
each gradient is None, zero, constant, sparse, or random at a random scale: ordinary,
huge (about 1e30), tiny (about 1e-30) or subnormal. Two optimizers get the same
gradients, ``fused=True`` (the C++ kernel) and ``fused=False`` (the pure-PyTorch
reference). After every step:

* parameters and every floating state tensor (window values, ``ef_min``, ``ef_max``) are
  finite, and no gradient was written;
* while the pure path has met no Top-K tie, the two states are bit-identical (window
  indices and values, packed codes, bucket ranges, step, seed) and the parameters agree
  to 2 ulp;
* at a step where the pure path's Top-K ties at a block's cut (the last kept and the first
  dropped |a| are equal, which all-zero, constant and subnormal gradients make
  unavoidable), the two paths may keep different but equally valid indices. What is still
  well defined is compared: in every block, the sorted magnitudes of the kept values of
  the row just written, and the step counter. The states then legitimately differ, so
  later steps of that parameter check finiteness only.

Magnitudes stay at or below 2^106 (~1e32): within about one order of magnitude of the
float32 maximum, g + Q^-1(e) and the window sums overflow (see the README's robustness
notes), which is a range limit, not something a fuzzer should rediscover on every run.

CI runs a small deterministic sample (``derandomize=True``, no example database). A longer
exploration, with a fresh random sample each run::

    MICROADAM_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/fuzz

Failures then print a ``@reproduce_failure`` blob to paste above the test.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microadam.optim.micro_adam as micro_adam_module
from microadam import Adapprox, MicroAdam
from microadam.compress.topk import topk_layout
from reference.micro_adam_reference import topk_cut_ties

_ENV = "MICROADAM_FUZZ_EXAMPLES"
_EXPLORE = _ENV in os.environ
EXAMPLES = int(os.environ.get(_ENV, "30"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not _EXPLORE,  # CI: the same sample on every run
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LONG = 100_000
# Power-of-two scales, so that the distinct magnitudes of the pool stay distinct.
SCALES = {"normal": 0, "huge": 100, "tiny": -100, "subnormal": -136}
# Adapprox squares the gradient in float32, so |g| >= 2^64 exercises its overflow handling.
ADAPPROX_SCALES = {"normal": 0, "huge": 100, "tiny": -100, "subnormal": -136}
POOL = 1 << 16
KINDS = ["none", "zero", "constant", "sparse", "random", "random", "random", "mixed"]


# -- strategies ------------------------------------------------------------------------------

_small = st.sampled_from([(), (0,), (1,), (2,), (3, 0), (7,), (33,), (1, 1)])
_vector = st.tuples(st.integers(1, 700))
_matrix = st.tuples(st.integers(1, 40), st.integers(1, 40))
# About one shape in eight is the long vector.
shapes = st.one_of(_small, _vector, _matrix, _small, _vector, _matrix, _vector, st.just((LONG,)))


@st.composite
def configs(draw):
    return dict(
        lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
        betas=draw(st.sampled_from([(0.9, 0.999), (0.0, 0.5), (0.5, 0.0)])),
        eps=draw(st.sampled_from([1e-8, 0.0])),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        window_size=draw(st.integers(1, 5)),
        density=draw(st.one_of(st.sampled_from([0.01, 0.5, 1.0]), st.floats(0.001, 1.0))),
        topk_block_size=draw(st.sampled_from([1, 3, 16, 24, 64, 100, 128, 1000, 4096])),
        quant_block_size=draw(st.sampled_from([1, 7, 16, 32, 50, 256])),
        quant_bits=draw(st.sampled_from([4, 8])),
        error_feedback=draw(st.booleans()),
        rounding=draw(st.sampled_from(["nearest", "stochastic"])),
        value_dtype=draw(st.sampled_from([torch.bfloat16, torch.float32])),
        maximize=draw(st.booleans()),
    )


@st.composite
def scenarios(draw):
    n_params = draw(st.integers(1, 3))
    param_shapes = [draw(shapes) for _ in range(n_params)]
    if sum(math.prod(s) for s in param_shapes) > LONG:  # at most one long tensor
        param_shapes = [s if math.prod(s) < LONG else (5,) for s in param_shapes]
        param_shapes[0] = (LONG,)
    steps = draw(st.integers(1, 6))
    plan = [
        [(draw(st.sampled_from(KINDS)), draw(st.sampled_from(list(SCALES)))) for _ in param_shapes]
        for _ in range(steps)
    ]
    return dict(
        shapes=param_shapes,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
        config=draw(configs()),
        plan=plan,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# -- gradients ------------------------------------------------------------------------------


def _distinct_magnitudes(numel: int, block: int, dtype, gen) -> torch.Tensor:
    """Values in +-[1/16, 16) whose magnitudes differ within each Top-K block of up to
    ``POOL`` elements (bf16 has only 1024 such values: larger bf16 blocks repeat some), so
    that Top-K sees no ties. Vectorized: block ``j`` reads a random permutation of the
    pool from a random offset."""
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    first = int(torch.tensor(0.0625, dtype=dtype).view(bits))
    width = int(torch.tensor(16.0, dtype=dtype).view(bits)) - first
    pool = min(width, POOL)
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    perm = torch.randperm(pool, generator=gen) * (width // pool)
    pos = torch.arange(numel)
    shift = torch.randint(0, pool, (-(-numel // block),), generator=gen)
    offsets = perm[(pos % block + shift[pos // block]) % pool]
    values = (offsets + first).to(bits).view(dtype)
    sign = torch.randint(0, 2, (numel,), generator=gen).to(dtype) * 2 - 1
    return values * sign


def make_grad(
    kind: str, scale: str, shape, dtype, block: int, gen, scales=SCALES
) -> torch.Tensor | None:
    numel = math.prod(shape)
    factor = 2.0 ** scales[scale]
    if kind == "none":
        return None
    if kind == "zero":
        g = torch.zeros(numel, dtype=dtype)
    elif kind == "constant":
        c = float(torch.empty(()).uniform_(-4, 4, generator=gen))
        g = torch.full((numel,), c * factor, dtype=dtype)
    elif kind == "sparse":
        g = torch.zeros(numel, dtype=dtype)
        if numel:
            idx = torch.randint(0, numel, (max(1, numel // 50),), generator=gen)
            g[idx] = _distinct_magnitudes(idx.numel(), idx.numel(), dtype, gen) * factor
    elif kind == "random":
        g = _distinct_magnitudes(numel, block, dtype, gen) * factor
    else:  # "mixed": every scale at once, zeros included
        g = _distinct_magnitudes(numel, block, dtype, gen)
        pick = torch.randint(0, len(scales) + 1, (numel,), generator=gen)
        exps = torch.tensor([*scales.values(), 0], dtype=torch.float64)
        mult = torch.where(pick == len(scales), 0.0, 2.0 ** exps[pick])
        g = (g.double() * mult).to(dtype)
    return g.reshape(shape)


# -- comparisons ----------------------------------------------------------------------------


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance between x and y in units in the last place of their dtype."""
    if x.numel() == 0:
        return 0
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[x.dtype]
    ix = x.detach().contiguous().view(bits).long()
    iy = y.detach().contiguous().view(bits).long()
    sign = 1 << (8 * x.element_size() - 1)
    ix = torch.where(ix < 0, -(ix + sign), ix)  # sign-magnitude bits onto a monotone line
    iy = torch.where(iy < 0, -(iy + sign), iy)
    return int((ix - iy).abs().max())


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype.is_floating_point else t.reshape(-1)


def assert_finite(param: torch.Tensor, state: dict, where: str) -> None:
    assert bool(torch.isfinite(param).all()), f"{where}: non-finite parameter"
    for key, value in state.items():
        if value.dtype.is_floating_point:
            assert bool(torch.isfinite(value.float()).all()), f"{where}: non-finite {key}"


def assert_same_state(fused: dict, pure: dict, where: str) -> None:
    assert fused.keys() == pure.keys(), where
    for key, expected in pure.items():
        got = fused[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, f"{where}: {key}"
        assert torch.equal(_raw(got), _raw(expected)), f"{where}: {key} differs"


def assert_same_kept_magnitudes(fused: dict, pure: dict, numel: int, h: dict, where: str):
    """With a tie at a block's cut, the kept indices may differ, but in each block the
    multiset of kept |values| is the same."""
    assert torch.equal(fused["step"], pure["step"]), where
    row = (int(pure["step"].item()) - 1) % h["window_size"]
    layout = topk_layout(numel, h["topk_block_size"], h["density"])
    for j in range(layout.num_blocks):
        c0, c1 = layout.columns(j, j + 1)
        a = fused["window_values"][row, c0:c1].float().abs().sort().values
        b = pure["window_values"][row, c0:c1].float().abs().sort().values
        assert torch.equal(a, b), f"{where}: block {j} keeps different magnitudes"


class TieWatch:
    """Records which parameters met a Top-K tie at a block's cut in the pure path."""

    def __init__(self, monkeypatch):
        self.current = None
        self.tied: set[int] = set()
        block_topk, step_ = micro_adam_module.block_topk, micro_adam_module.micro_adam_step_

        def watched_topk(x, block_size, k_block, k_tail):
            if topk_cut_ties(x, block_size, k_block, k_tail):
                self.tied.add(self.current)
            return block_topk(x, block_size, k_block, k_tail)

        def watched_step(param, *args, **kwargs):
            self.current = id(param)
            return step_(param, *args, **kwargs)

        monkeypatch.setattr(micro_adam_module, "block_topk", watched_topk)
        monkeypatch.setattr(micro_adam_module, "micro_adam_step_", watched_step)


# -- the fuzz tests --------------------------------------------------------------------------


def run_scenario(s: dict, monkeypatch) -> None:
    gen = torch.Generator().manual_seed(s["seed"])
    config, dtype = s["config"], s["dtype"]
    pairs = []
    for shape in s["shapes"]:
        init = torch.randn(shape, generator=gen).to(dtype)
        pairs.append(
            (torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone()), math.prod(shape))
        )
    fused = MicroAdam([f for f, _, _ in pairs], fused=True, **config)
    pure = MicroAdam([p for _, p, _ in pairs], fused=False, **config)
    ties = TieWatch(monkeypatch)
    diverged: set[int] = set()
    for t, kinds in enumerate(s["plan"], start=1):
        grads = [
            make_grad(kind, scale, f.shape, dtype, config["topk_block_size"], gen)
            for (kind, scale), (f, _, _) in zip(kinds, pairs, strict=True)
        ]
        for (f, p, _), g in zip(pairs, grads, strict=True):
            f.grad = None if g is None else g.clone()
            p.grad = None if g is None else g.clone()
        ties.tied.clear()
        torch.manual_seed(t)  # stochastic rounding seeds are drawn when a state is created
        fused.step()
        torch.manual_seed(t)
        pure.step()
        for i, ((f, p, numel), g, (kind, scale)) in enumerate(
            zip(pairs, grads, kinds, strict=True)
        ):
            where = f"step {t}, param {i} {tuple(f.shape)} {dtype}, grad {kind}/{scale}"
            if g is not None:
                assert torch.equal(f.grad, g) and torch.equal(p.grad, g), f"{where}: grad written"
            assert_finite(f, fused.state[f], f"{where}, fused")
            assert_finite(p, pure.state[p], f"{where}, pure")
            if i in diverged:
                continue
            if id(p) in ties.tied:
                assert_same_kept_magnitudes(fused.state[f], pure.state[p], numel, config, where)
                diverged.add(i)
                continue
            assert_same_state(fused.state[f], pure.state[p], where)
            distance = ulp_distance(f, p)
            assert distance <= 2, f"{where}: parameters differ by {distance} ulp"


@FUZZ
@given(s=scenarios())
def test_fuzz_micro_adam_fused_matches_pure_and_stays_finite(s, fused_kernel):
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_scenario(s, monkeypatch)


adapprox_shapes = st.one_of(
    st.sampled_from([(), (0,), (3, 0), (1, 1), (5,)]),
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
    st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 8)),
)


@FUZZ
@given(
    shape=adapprox_shapes,
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    beta1=st.sampled_from([None, 0.9]),
    plan=st.lists(
        st.tuples(st.sampled_from(KINDS), st.sampled_from(list(SCALES))), min_size=1, max_size=5
    ),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_adapprox_stays_finite(shape, dtype, beta1, plan, seed):
    gen = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = Adapprox([p], lr=1e-2, betas=(beta1, 0.999), weight_decay=0.1)
    torch.manual_seed(seed)
    for t, (kind, scale) in enumerate(plan, start=1):
        p.grad = make_grad(kind, scale, shape, dtype, 64, gen, ADAPPROX_SCALES)
        opt.step()
        where = f"step {t} {shape} {dtype} grad {kind}/{scale}"
        assert bool(torch.isfinite(p).all()), f"{where}: non-finite parameter"
        for key, value in opt.state[p].items():
            if value.dtype.is_floating_point:
                assert bool(torch.isfinite(value).all()), f"{where}: non-finite {key}"


# -- huge gradients ------------------------------------------------------------------------


def test_adapprox_gradient_above_2_to_64_keeps_parameters_finite():
    # Formerly a strict xfail: the factored second moment turned g^2 = inf into NaN.
    p = torch.nn.Parameter(torch.zeros(2, 1))
    opt = Adapprox([p], betas=(None, 0.999))
    p.grad = torch.full((2, 1), 1e30)
    opt.step()
    assert bool(torch.isfinite(p).all()), p


# Every path saturates its window values (compress.window.saturating_cast; the fused CPU
# kernel's window_value), so gradients near float32's maximum leave the state finite.
@pytest.mark.parametrize("fused", [False, None])
def test_micro_adam_gradient_near_float_max_keeps_state_finite(fused):
    p = torch.nn.Parameter(torch.zeros(4))
    opt = MicroAdam([p], density=0.25, topk_block_size=4, quant_block_size=4, fused=fused)
    for _ in range(2):
        p.grad = torch.tensor([2e38, -1.8e38, 1.0, 2.0])
        opt.step()
    assert bool(torch.isfinite(p).all()), p
    assert bool(torch.isfinite(opt.state[p]["window_values"].float()).all())
