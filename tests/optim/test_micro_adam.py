"""MicroAdam's contract: AdamW equivalence, checkpoints, errors, memory (design page)."""

import io
import math

import pytest
import torch

from microadam import MicroAdam, state_bytes
from microadam.compress import unpack_nibbles
from microadam.optim.micro_adam import DEFAULT_QUANT_BLOCK_SIZE


def _grads(shape, steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(steps)]


def _run(opt_cls, param, grads, **kw):
    p = torch.nn.Parameter(param.clone())
    opt = opt_cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


# -- 1. density 1 + long window + exact values == AdamW -----------------------------------


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_adamw_at_full_density(dtype, rtol, weight_decay):
    torch.manual_seed(0)
    shape, steps = (37, 29), 50
    x0 = torch.randn(shape, dtype=dtype)
    grads = _grads(shape, steps, dtype)
    hp = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ours, _ = _run(
        MicroAdam,
        x0,
        grads,
        **hp,
        density=1.0,
        window_size=steps,
        value_dtype=dtype,
        topk_block_size=128,
    )
    ref, _ = _run(torch.optim.AdamW, x0, grads, **hp)
    assert not torch.equal(ref, x0)
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def test_bias_correction_uses_the_full_step_count():
    # Beyond the window the step of an always-kept coordinate grows above Adam's: with a
    # constant gradient Adam moves lr per step; MicroAdam moves
    # lr * (1-b1^m)/(1-b1^t) / sqrt((1-b2^m)/(1-b2^t)) -> ~6.5 lr at m=10 and default betas.
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = MicroAdam([p], lr=1.0, eps=0.0, density=1.0, window_size=10, value_dtype=torch.float64)
    t = 3000
    for _ in range(t):
        before = p.detach().clone()
        p.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
    step_size = (before - p.detach()).abs().max().item()
    b1, b2 = 0.9, 0.999
    expected = (1 - b1**10) / (1 - b1**t) / math.sqrt((1 - b2**10) / (1 - b2**t))
    assert step_size == pytest.approx(expected, rel=1e-9)
    assert step_size > 6.3
    limit = (1 - b1**10) / math.sqrt(1 - b2**10)
    assert 6.5 < limit < 6.55


# -- 4. state_dict determinism --------------------------------------------------------------


def _clone_state(opt, p):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("through_disk", [False, True])
def test_state_dict_resume_is_identical(dtype, rounding, through_disk):
    torch.manual_seed(1)
    kw = dict(
        lr=1e-2,
        density=0.02,
        window_size=4,
        topk_block_size=2000,
        rounding=rounding,
        weight_decay=0.01,
    )
    params = [
        torch.nn.Parameter(torch.randn(5000, dtype=dtype)),
        torch.nn.Parameter(torch.randn(7, 13, dtype=dtype)),
    ]
    opt = MicroAdam(params, **kw)
    grads = [[torch.randn_like(p) for p in params] for _ in range(20)]
    for gs in grads[:10]:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    idx = opt.state[params[0]]["window_indices"]
    assert int(idx.max()) > 256  # indices that bf16 could not represent survive the reload
    sd = opt.state_dict()
    if through_disk:
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = MicroAdam(clones, lr=0.5)  # hyperparameters come from the state dict
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["density"] == 0.02 and fresh.param_groups[0]["lr"] == 1e-2
    for p, c in zip(params, clones, strict=True):
        for key, value in opt.state[p].items():
            loaded = fresh.state[c][key]
            assert loaded.dtype == value.dtype, key
            assert torch.equal(loaded, value), key
            assert loaded.data_ptr() != value.data_ptr()  # no shared buffers
    for gs in grads[10:]:
        for p, c, g in zip(params, clones, gs, strict=True):
            p.grad, c.grad = g.clone(), g.clone()
        opt.step()
        fresh.step()
    for p, c in zip(params, clones, strict=True):
        assert torch.equal(p, c)
        for key, value in opt.state[p].items():
            assert torch.equal(fresh.state[c][key], value), key


def test_load_state_dict_rejects_mismatches_and_keeps_state():
    p = torch.nn.Parameter(torch.randn(300))
    opt = MicroAdam([p], density=0.1)
    p.grad = torch.randn(300)
    opt.step()
    before = _clone_state(opt, p)
    other = torch.nn.Parameter(torch.randn(400))
    wrong_shape = MicroAdam([other], density=0.1)
    other.grad = torch.randn(400)
    wrong_shape.step()
    with pytest.raises(
        ValueError,
        match=r"parameter 0 of param group 0 \(shape \(300,\)\).*"
        r"window_indices has shape \(10, 40\), expected \(10, 30\)",
    ):
        opt.load_state_dict(wrong_shape.state_dict())
    adam_sd = torch.optim.Adam([p]).state_dict()
    with pytest.raises(
        ValueError, match=r"has no .microadam_format., so it looks like another optimizer"
    ):
        opt.load_state_dict(adam_sd)
    future = opt.state_dict()
    future["microadam_format"] = 99
    with pytest.raises(ValueError, match=r"microadam_format is 99"):
        opt.load_state_dict(future)
    bad = opt.state_dict()
    bad["param_groups"][0]["density"] = 2.0
    with pytest.raises(ValueError, match=r"param group 0: Invalid density: 2.0"):
        opt.load_state_dict(bad)
    after = opt.state[p]
    assert all(torch.equal(after[k], v) for k, v in before.items())


# -- 5. gradients, errors, policies ------------------------------------------------------------


def test_grad_is_read_not_written_and_none_grads_are_skipped():
    a = torch.nn.Parameter(torch.randn(1000))
    b = torch.nn.Parameter(torch.randn(50))
    opt = MicroAdam([a, b], density=0.05)
    for dtype in (torch.float32,):
        g = torch.randn(1000, dtype=dtype)
        a.grad = g.clone()
        opt.step()
        assert torch.equal(a.grad, g)
    b_before = b.detach().clone()
    assert len(opt.state[b]) == 0
    assert opt.state[a]["step"].item() == 1
    b.grad = torch.randn(50)
    a.grad = None
    a_before = a.detach().clone()
    opt.step()
    assert torch.equal(a, a_before) and opt.state[a]["step"].item() == 1
    assert not torch.equal(b, b_before) and opt.state[b]["step"].item() == 1


def test_bf16_grad_is_unchanged_and_float_state_is_used():
    p = torch.nn.Parameter(torch.randn(3000, dtype=torch.bfloat16))
    opt = MicroAdam([p], density=0.05, maximize=True)
    g = torch.randn(3000, dtype=torch.bfloat16)
    p.grad = g.clone()
    opt.step()
    assert torch.equal(p.grad, g)
    assert p.dtype == torch.bfloat16


def test_zero_grad_step_changes_nothing_but_weight_decay():
    p = torch.nn.Parameter(torch.randn(500))
    x0 = p.detach().clone()
    opt = MicroAdam([p], weight_decay=0.1, lr=0.01)
    p.grad = torch.zeros(500)
    opt.step()
    torch.testing.assert_close(p.detach(), x0 * (1 - 0.01 * 0.1), rtol=0, atol=1e-7)


def test_sparse_and_complex_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MicroAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(
        RuntimeError, match=r"does not support sparse gradients; use torch\.optim\.SparseAdam"
    ):
        opt.step()
    with pytest.raises(
        RuntimeError, match=r"does not support complex parameters; optimize torch\.view_as_real"
    ):
        MicroAdam([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("density", 0.02, r"window_indices has shape \(10, 10\), expected \(10, 20\)"),
        ("window_size", 4, r"window_indices has shape \(10, 10\), expected \(4, 10\)"),
        ("quant_bits", 8, r"ef_codes has shape \(500,\), expected \(1000,\)"),
        ("value_dtype", torch.float16, r"window_values has dtype torch.bfloat16, expected"),
    ],
)
@pytest.mark.parametrize("fused", [None, False])
def test_changed_state_settings_raise_at_the_next_step_and_change_nothing(
    key, value, message, fused
):
    # The state check is skipped while nothing changed; a changed setting must still be
    # caught before anything is stepped, and the old setting must work again.
    p = torch.nn.Parameter(torch.randn(1000))
    opt = MicroAdam([p], density=0.01, topk_block_size=1000, fused=fused)
    for _ in range(2):
        p.grad = torch.randn(1000)
        opt.step()
    x, st = p.detach().clone(), _clone_state(opt, p)
    old = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert torch.equal(p, x)
    assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    opt.param_groups[0][key] = old
    opt.step()
    assert opt.state[p]["step"].item() == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_raises_and_changes_nothing(bad):
    a = torch.nn.Parameter(torch.randn(100))
    b = torch.nn.Parameter(torch.randn(100))
    opt = MicroAdam([a, b], density=0.1, weight_decay=0.1)
    a.grad, b.grad = torch.randn(100), torch.randn(100)
    opt.step()
    saved = {p: (p.detach().clone(), _clone_state(opt, p)) for p in (a, b)}
    a.grad = torch.randn(100)  # a is fine and comes first: it must not be stepped either
    b.grad = torch.randn(100)
    b.grad[17] = bad
    with pytest.raises(
        RuntimeError,
        match=r"non-finite gradient \(NaN or inf\) for parameter 1 of "
        r"param group 0 \(shape \(100,\)\); nothing was updated",
    ):
        opt.step()
    for p, (x, st) in saved.items():
        assert torch.equal(p, x)
        assert all(torch.equal(opt.state[p][k], v) for k, v in st.items())
    b.grad[17] = 0.0
    opt.step()  # and the run continues once the caller skips or fixes the batch
    assert opt.state[b]["step"].item() == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1.0), "Invalid lr: -1.0 (expected lr >= 0)"),
        (dict(betas=(1.0, 0.9)), "Invalid beta parameter at index 0: 1.0 (expected 0 <= beta < 1)"),
        (
            dict(betas=(0.9, -0.1)),
            "Invalid beta parameter at index 1: -0.1 (expected 0 <= beta < 1)",
        ),
        (dict(eps=-1e-8), "Invalid eps: -1e-08 (expected eps >= 0)"),
        (dict(weight_decay=-0.1), "Invalid weight_decay: -0.1 (expected weight_decay >= 0)"),
        (dict(window_size=0), "Invalid window_size: 0 (expected an integer >= 1)"),
        (dict(window_size=2.5), "Invalid window_size: 2.5 (expected an integer >= 1)"),
        (dict(density=0.0), "Invalid density: 0.0 (expected 0 < density <= 1)"),
        (dict(density=1.5), "Invalid density: 1.5 (expected 0 < density <= 1)"),
        (
            dict(topk_block_size=0),
            "Invalid topk_block_size: 0 (expected an integer, 1 <= topk_block_size <= 32768)",
        ),
        (
            dict(topk_block_size=32769),
            "Invalid topk_block_size: 32769 (expected an integer, 1 <= topk_block_size <= 32768)",
        ),
        (dict(quant_block_size=0), "Invalid quant_block_size: 0 (expected an integer >= 1)"),
        (dict(quant_bits=2), "Invalid quant_bits: 2 (expected 4 or 8)"),
        (dict(error_feedback="yes"), "Invalid error_feedback: 'yes' (expected True or False)"),
        (dict(rounding="up"), "Invalid rounding: 'up' (expected 'nearest' or 'stochastic')"),
        (
            dict(value_dtype=torch.int8),
            "Invalid value_dtype: torch.int8 (expected a floating torch.dtype)",
        ),
        (dict(maximize=1), "Invalid maximize: 1 (expected True or False)"),
    ],
)
def test_invalid_hyperparameters_name_argument_and_value(kwargs, message):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as info:
        MicroAdam([p], **kwargs)
    assert str(info.value) == message
    # the same check guards per-group overrides
    with pytest.raises(ValueError) as info:
        MicroAdam([{"params": [p], **kwargs}])
    assert str(info.value) == message


def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        MicroAdam([torch.nn.Parameter(torch.zeros(3))], k_init=0.01)


def test_accepts_official_block_layouts_and_tensor_lr():
    for block in (20864, 29056):
        p = torch.nn.Parameter(torch.randn(70_000))
        opt = MicroAdam([p], lr=torch.tensor(1e-3), topk_block_size=block, quant_block_size=100_000)
        p.grad = torch.randn(70_000)
        opt.step()
        full, tail = divmod(70_000, block)
        k = full * math.ceil(block * 0.01) + math.ceil(tail * 0.01)
        assert opt.state[p]["window_indices"].shape == (10, k)


def test_changing_layout_after_first_step_is_refused():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = MicroAdam([p], density=0.1)
    p.grad = torch.randn(1000)
    opt.step()
    opt.param_groups[0]["window_size"] = 5
    with pytest.raises(
        RuntimeError, match=r"window_indices has shape \(10, 100\), expected \(5, 100\)"
    ):
        opt.step()


def test_param_groups_keep_their_own_hyperparameters():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(400))
    b = torch.nn.Parameter(torch.randn(400))
    opt = MicroAdam(
        [{"params": [a]}, {"params": [b], "lr": 0.0, "density": 0.5, "quant_bits": 8}],
        lr=1e-2,
        density=0.05,
    )
    b0 = b.detach().clone()
    a.grad, b.grad = torch.randn(400), torch.randn(400)
    opt.step()
    assert torch.equal(b, b0)  # lr 0 in its own group
    assert opt.state[a]["window_indices"].shape == (10, 20)
    assert opt.state[b]["window_indices"].shape == (10, 200)
    assert opt.state[b]["ef_codes"].numel() == 400 and opt.state[a]["ef_codes"].numel() == 200


def test_error_feedback_off_keeps_no_error_state():
    p = torch.nn.Parameter(torch.randn(100))
    opt = MicroAdam([p], error_feedback=False)
    p.grad = torch.randn(100)
    opt.step()
    assert set(opt.state[p]) == {"step", "window_indices", "window_values"}


def test_only_window_coordinates_move():
    p = torch.nn.Parameter(torch.randn(5000))
    x0 = p.detach().clone()
    opt = MicroAdam([p], density=0.01, window_size=3)
    for _ in range(2):
        p.grad = torch.randn(5000)
        opt.step()
    moved = (p.detach() != x0).nonzero().flatten()
    st = opt.state[p]
    cols = st["window_indices"][:2].long()
    lay_k = cols.shape[1]
    block = torch.arange(lay_k) // 41  # 41 kept per block of 4096 at 1%
    expected = (cols + block * 4096).flatten().unique()
    assert torch.equal(moved.sort().values, expected.sort().values)


# -- 6. state bytes ---------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("numel", [1, 1001, 50_000])
def test_state_bytes_follow_the_formula(bits, numel):
    p = torch.nn.Parameter(torch.randn(numel))
    opt = MicroAdam([p], quant_bits=bits)
    p.grad = torch.randn(numel)
    opt.step()
    m, k = opt.state[p]["window_indices"].shape
    q = DEFAULT_QUANT_BLOCK_SIZE
    codes = math.ceil(numel / 2) if bits == 4 else numel
    assert state_bytes(opt) == codes + 4 * m * k + 4 * math.ceil(numel / q) + 4  # + float32 step


def test_under_one_byte_per_parameter_at_defaults():
    model = torch.nn.Sequential(
        torch.nn.Embedding(256, 256),
        torch.nn.Linear(256, 1024),
        torch.nn.Linear(1024, 1024),
        torch.nn.Linear(1024, 256),
        torch.nn.LayerNorm(256),
    )
    opt = MicroAdam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert n > 1_500_000
    per_param = state_bytes(opt) / n
    assert per_param <= 1.0, per_param
    adam = torch.optim.AdamW(model.parameters())
    adam.step()
    assert state_bytes(adam) / n > 8


def test_codes_pack_even_elements_high():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = MicroAdam([p], density=0.2, quant_block_size=5, topk_block_size=5)
    p.grad = torch.tensor([5.0, 1.0, 2.1, 3.0, 4.0])  # 5.0 goes to the window
    opt.step()
    codes = unpack_nibbles(opt.state[p]["ef_codes"], 5)
    # residual [0, 1, 2.1, 3, 4] over [0, 4]: step 4/15, codes round(x * 15 / 4)
    assert codes.tolist() == [0, 4, 8, 11, 15]
    assert opt.state[p]["ef_codes"].tolist() == [0x04, 0x8B, 0xF0]
