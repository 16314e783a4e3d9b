"""MuonClip: QK-clip against the published rule written out plainly here (every logit of
every head with einsum, the max, the rows rescaled by gamma ** alpha and gamma ** (1 - alpha)),
Muon exactly when the clip is off, nn.MultiheadAttention and TinyGPT (directly and through
the registry), masks, what is and is not recorded, checkpoints and validation."""

from __future__ import annotations

import copy
import doctest
import gc
import io
import math

import pytest
import torch
from torch import nn

import microadam.optim.muonclip as muonclip_module
from microadam.bench.models import TinyGPT, _Block
from microadam.optim.muon import Muon, muon_param_groups
from microadam.optim.muonclip import MuonClip
from microadam.optim.registry import create_optimizer

DTYPE = torch.float64
TAU = 100.0  # K2's threshold, the default


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is faster and keeps the runs bit-reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


# -- the published rule, written out plainly --------------------------------------------


def reference_max_logits(q, k, used=None):
    """S_max^h = max over the used (i, j) and the batch of q_i^h . k_j^h / sqrt(d_h), one
    head at a time. q: (N, L, H, d_h), k: (N, S, H, d_h); used: bool, broadcastable to
    (N, H, L, S), True where the softmax sees the logit."""
    n, length, heads, dh = q.shape
    source = k.shape[1]
    maxima = []
    for h in range(heads):
        logits = torch.einsum("nid,njd->nij", q[:, :, h], k[:, :, h]) / math.sqrt(dh)
        if used is not None:
            mask = used.expand(n, heads, length, source)[:, h]
            logits = logits[mask]
        maxima.append(logits.max())
    return torch.stack(maxima)


def reference_clip(w_q, w_k, b_q, b_k, s_max, tau, alpha):
    """New (w_q, w_k, b_q, b_k): head h's rows times gamma_h ** alpha (queries) and
    gamma_h ** (1 - alpha) (keys) where S_max^h > tau, gamma_h = tau / S_max^h."""
    heads = s_max.numel()
    out = [None if t is None else t.detach().clone() for t in (w_q, w_k, b_q, b_k)]
    dh = w_q.shape[0] // heads
    for h in range(heads):
        s = s_max[h].item()
        if not s > tau:
            continue
        gamma = tau / s
        q_factor = math.sqrt(gamma) if alpha == 0.5 else gamma**alpha
        k_factor = math.sqrt(gamma) if alpha == 0.5 else gamma ** (1 - alpha)
        rows = slice(h * dh, (h + 1) * dh)
        for t, factor in zip(out, (q_factor, k_factor, q_factor, k_factor), strict=True):
            if t is not None:
                t[rows] *= factor
    return out


# -- models and their q, k written out ---------------------------------------------------


def make_mha(embed=8, heads=2, *, seed=0, big_heads=(), factor=30.0, **kwargs):
    """A float64 nn.MultiheadAttention with a nonzero in_proj_bias; the q and k rows of
    ``big_heads`` are multiplied by ``factor`` (their logits by factor ** 2)."""
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(embed, heads, dtype=DTYPE, **kwargs)
    dh = embed // heads
    with torch.no_grad():
        if m.in_proj_bias is not None:
            m.in_proj_bias.copy_(0.5 * seeded(3 * embed, seed=seed + 1))
        for h in big_heads:
            rows = slice(h * dh, (h + 1) * dh)
            if m.in_proj_weight is not None:
                m.in_proj_weight[rows] *= factor
                m.in_proj_weight[embed:][rows] *= factor
            else:
                m.q_proj_weight[rows] *= factor
                m.k_proj_weight[rows] *= factor
    return m


def mha_rows(m):
    """(W_q, W_k, b_q, b_k) of an nn.MultiheadAttention, as views."""
    e = m.embed_dim
    if m.in_proj_weight is not None:
        w_q, w_k = m.in_proj_weight[:e], m.in_proj_weight[e : 2 * e]
    else:
        w_q, w_k = m.q_proj_weight, m.k_proj_weight
    b = m.in_proj_bias
    return w_q, w_k, (None if b is None else b[:e]), (None if b is None else b[e : 2 * e])


def mha_qk(m, query, key):
    """q (N, L, H, d_h) and k (N, S, H, d_h) from batch-first inputs, as x W^T + b."""
    w_q, w_k, b_q, b_k = mha_rows(m)
    q = query @ w_q.T + (0 if b_q is None else b_q)
    k = key @ w_k.T + (0 if b_k is None else b_k)
    h = m.num_heads
    return q.unflatten(-1, (h, -1)), k.unflatten(-1, (h, -1))


def tiny_gpt(seed=0, n_layer=2, n_head=2, d_model=16, context=8):
    torch.manual_seed(seed)
    return TinyGPT(context=context, d_model=d_model, n_layer=n_layer, n_head=n_head).to(DTYPE)


def qkv_rows(linear, heads=None):
    d = linear.out_features // 3
    w, b = linear.weight, linear.bias
    return (
        w[:d],
        w[d : 2 * d],
        (None if b is None else b[:d]),
        (None if b is None else b[d : 2 * d]),
    )


def scale_head(block, head, factor):
    """Multiply the q and k rows (and bias) of one head of a TinyGPT block."""
    dh = block.qkv.out_features // 3 // block.n_head
    rows = slice(head * dh, (head + 1) * dh)
    with torch.no_grad():
        for t in qkv_rows(block.qkv):
            t[rows] *= factor


def gpt_reference_max_logits(model, idx, causal=True):
    """Per block: the reference S_max of the logits of that forward pass (the block's
    qkv input captured, then q = x W_q^T + b_q and k = x W_k^T + b_k written out)."""
    inputs = []
    handles = [
        b.qkv.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
        for b in model.blocks
    ]
    with torch.no_grad():
        model(idx)
    for handle in handles:
        handle.remove()
    t = idx.shape[1]
    used = torch.ones(t, t, dtype=torch.bool).tril() if causal else None
    result = []
    for block, x in zip(model.blocks, inputs, strict=True):
        w_q, w_k, b_q, b_k = qkv_rows(block.qkv)
        q = (x @ w_q.T + b_q).unflatten(-1, (block.n_head, -1))
        k = (x @ w_k.T + b_k).unflatten(-1, (block.n_head, -1))
        result.append(reference_max_logits(q, k, used))
    return result


def gpt_batch(seed, batch=3, t=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, t), generator=g)


def gpt_step(model, opt, idx):
    opt.zero_grad()
    _, loss = model(idx, idx)
    loss.backward()
    opt.step()
    return loss.detach()


def stat(opt, p, key="qk_last_max_logit"):
    return opt.state[p][key]


# -- 1. one step against the published rule ----------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.25])
@pytest.mark.parametrize("lr", [0.0, 0.05])
def test_one_step_is_the_published_rule(alpha, lr):
    mha = make_mha(big_heads=(0,), batch_first=True)
    twin = copy.deepcopy(mha)
    x, target = seeded(3, 5, 8, seed=10), seeded(3, 5, 8, seed=11)
    s_max = reference_max_logits(*mha_qk(mha, x, x))
    assert s_max[0] > TAU > s_max[1]  # head 0 is clipped, head 1 is not

    hp = dict(lr=lr, adamw_lr=lr, ns_dtype=DTYPE)
    opt = MuonClip(muon_param_groups(mha, last_linear_is_head=False), qk_clip_alpha=alpha, **hp)
    assert opt.watch(mha) == [""]
    base = Muon(muon_param_groups(twin, last_linear_is_head=False), **hp)
    for m, o in ((mha, opt), (twin, base)):
        nn.functional.mse_loss(m(x, x, x, need_weights=False)[0], target).backward()
        o.step()

    # what was recorded, and reset for the next step
    torch.testing.assert_close(stat(opt, mha.in_proj_weight), s_max, rtol=1e-14, atol=0)
    assert torch.equal(stat(opt, mha.in_proj_weight, "qk_max_logit"), torch.full((2,), -math.inf))
    # the Muon (and AdamW) update, then the rule on its result
    want = reference_clip(*mha_rows(twin), s_max, TAU, alpha)
    for got, expected in zip(mha_rows(mha), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    # head 1 of q and k, every value row and everything else: bit-for-bit the update's
    head_1 = slice(4, 8)
    for got, base_rows in zip(mha_rows(mha), mha_rows(twin), strict=True):
        assert torch.equal(got[head_1], base_rows[head_1])
        assert not torch.equal(got[:4], base_rows[:4])
    assert torch.equal(mha.in_proj_weight[16:], twin.in_proj_weight[16:])
    assert torch.equal(mha.in_proj_bias[16:], twin.in_proj_bias[16:])
    assert torch.equal(mha.out_proj.weight, twin.out_proj.weight)
    assert torch.equal(mha.out_proj.bias, twin.out_proj.bias)
    if lr == 0.0:
        # nothing but the clip moved the weights: the largest logit of the batch is now tau
        after = reference_max_logits(*mha_qk(mha, x, x))
        assert abs(after[0].item() - TAU) < 1e-10
        assert torch.equal(after[1], s_max[1])


# -- 2. heads at or below tau are untouched -----------------------------------------------


def test_heads_below_tau_are_untouched_bit_for_bit():
    model = tiny_gpt()
    scale_head(model.blocks[0], 0, 60.0)
    idx = gpt_batch(0)
    block_0, block_1 = gpt_reference_max_logits(model, idx)
    assert block_0[0] > 2 * block_0[1] and block_0[0] > 2 * block_1.max()
    tau = (block_0[0] / 2).item()  # only head 0 of block 0 is above it
    twin = copy.deepcopy(model)
    opt = create_optimizer("muonclip", model, qk_clip_tau=tau, ns_dtype=DTYPE)
    base = create_optimizer("muon", twin, ns_dtype=DTYPE)
    assert torch.equal(gpt_step(model, opt, idx), gpt_step(twin, base, idx))
    d, dh = 16, 8
    clipped = [(0, slice(0, dh)), (0, slice(d, d + dh))]  # block 0, head 0, q and k rows
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name in ("blocks.0.qkv.weight", "blocks.0.qkv.bias"):
            for _, rows in clipped:
                assert not torch.equal(p[rows], q[rows]), name
            untouched = torch.ones(p.shape[0], dtype=torch.bool)
            untouched[0:dh] = untouched[d : d + dh] = False
            assert torch.equal(p[untouched], q[untouched]), name
        else:
            assert torch.equal(p, q), name
    assert stat(opt, model.blocks[0].qkv.weight)[0] > tau


# -- 3. with the clip off, MuonClip is Muon -----------------------------------------------


@pytest.mark.parametrize("tau", [math.inf, 1e30])
def test_without_clipping_it_is_muon_bit_for_bit(tau):
    model = tiny_gpt(seed=1)
    twin = copy.deepcopy(model)
    opt = create_optimizer("muonclip", model, qk_clip_tau=tau, weight_decay=0.1)
    base = create_optimizer("muon", twin, weight_decay=0.1)
    for step in range(5):
        idx = gpt_batch(step)
        # the hooks change neither the loss nor the gradients
        assert torch.equal(gpt_step(model, opt, idx), gpt_step(twin, base, idx))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        ours = {k: v for k, v in opt.state[p].items() if not k.startswith("qk_")}
        assert ours.keys() == base.state[q].keys()
        for key, value in ours.items():
            assert torch.equal(value, base.state[q][key])
    assert torch.isfinite(stat(opt, model.blocks[0].qkv.weight)).all()


def test_multihead_attention_without_clipping_is_muon_and_leaves_the_output_alone():
    mha = make_mha(big_heads=(0,))
    twin = copy.deepcopy(mha)
    opt = MuonClip(muon_param_groups(mha), qk_clip_tau=math.inf)
    opt.watch(mha)
    base = Muon(muon_param_groups(twin))
    for step in range(3):
        x = seeded(5, 2, 8, seed=20 + step)  # (L, N, E)
        outputs = []
        for m, o in ((mha, opt), (twin, base)):
            o.zero_grad()
            out, weights = m(x, x, x)
            outputs.append((out, weights))
            out.square().mean().backward()
            o.step()
        assert torch.equal(outputs[0][0], outputs[1][0])
        assert torch.equal(outputs[0][1], outputs[1][1])
    for p, q in zip(mha.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


# -- 4. the modules: what is recorded -------------------------------------------------------


def test_tinygpt_through_the_registry_records_only_the_causal_logits():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    idx = gpt_batch(1)
    model(idx)
    causal = gpt_reference_max_logits(model, idx)
    full = gpt_reference_max_logits(model, idx, causal=False)
    assert any((f > c).any() for f, c in zip(full, causal, strict=True))  # the mask matters
    for block, want in zip(model.blocks, causal, strict=True):
        got = stat(opt, block.qkv.weight, "qk_max_logit")
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    # and the registry's step clips: tau below every max logit
    opt = create_optimizer("muonclip", model, qk_clip_tau=1e-6, ns_dtype=DTYPE, lr=0.0)
    opt.param_groups[1]["lr"] = 0.0  # AdamW group: nothing but the clip moves
    gpt_step(model, opt, idx)
    # block 0 sees the same input again (block 1 does not: block 0's attention changed)
    block_0 = gpt_reference_max_logits(model, idx)[0]
    torch.testing.assert_close(block_0, torch.full_like(block_0, 1e-6), rtol=1e-10, atol=0)


def _logits(mha, query, key):
    """Every logit, (N, H, L, S), of batch-first inputs."""
    q, k = mha_qk(mha, query, key)
    return torch.einsum("nihd,njhd->nhij", q, k) / math.sqrt(q.shape[-1])


def _mha_case(name):
    """(module kwargs, forward builder) for one way of calling nn.MultiheadAttention. The
    builder takes the module and returns (args, kwargs, batch-first query, batch-first key,
    used); its masks exclude the largest logit of at least one head, so that they matter."""
    n, length, source, e, h = 2, 4, 6, 8, 2

    def seq_first(mha):
        x = seeded(length, n, e, seed=30)
        return (x, x, x), {}, x.transpose(0, 1), x.transpose(0, 1), None

    def causal_float_mask(mha):
        used = torch.ones(length, length, dtype=torch.bool).tril()
        for seed in range(31, 100):  # an input whose largest logit lies above the diagonal
            x = seeded(n, length, e, seed=seed)
            logits = _logits(mha, x, x)
            if (
                logits.amax(dim=(0, 2, 3))
                > logits.masked_fill(~used, -math.inf).amax(dim=(0, 2, 3))
            ).any():
                break
        mask = nn.Transformer.generate_square_subsequent_mask(length, dtype=DTYPE)
        kwargs = dict(attn_mask=mask, is_causal=True, need_weights=False)
        return (x, x, x), kwargs, x, x, used

    def bool_mask_and_padding(mha):
        x, y = seeded(n, length, e, seed=32), seeded(n, source, e, seed=33)
        g = torch.Generator().manual_seed(34)
        mask = torch.rand(n, h, length, source, generator=g) < 0.3
        # mask out each head's largest logit
        logits = _logits(mha, x, y)
        for head in range(h):
            flat = logits[:, head].argmax()
            b, i, j = torch.unravel_index(flat, (n, length, source))
            mask[b, head, i, j] = True
        mask[..., 0] = False  # every query sees a key
        padding = torch.zeros(n, source, dtype=torch.bool)
        padding[1, -2:] = True
        used = ~mask & ~padding.view(n, 1, 1, source)
        kwargs = dict(attn_mask=mask.view(n * h, length, source), key_padding_mask=padding)
        return (x, y, y), kwargs, x, y, used

    def finite_float_bias(mha):
        x = seeded(n, length, e, seed=35)
        bias = seeded(length, length, seed=36)
        _, i, j = torch.unravel_index(_logits(mha, x, x)[:, 0].argmax(), (n, length, length))
        bias[i, j] = -math.inf  # head 0's largest logit is excluded
        return (x, x, x), dict(attn_mask=bias), x, x, ~torch.isneginf(bias)

    def kdim_vdim(mha):
        x = seeded(n, length, e, seed=37)
        y, z = seeded(n, source, 6, seed=38), seeded(n, source, 5, seed=39)
        return (x,), dict(key=y, value=z), x, y, None

    def unbatched(mha):
        x = seeded(length, e, seed=40)
        return (x, x, x), {}, x.unsqueeze(0), x.unsqueeze(0), None

    cases = {
        "seq_first": ({}, seq_first),
        "causal_float_mask": ({"batch_first": True}, causal_float_mask),
        "bool_mask_and_padding": ({"batch_first": True}, bool_mask_and_padding),
        "finite_float_bias": ({"batch_first": True}, finite_float_bias),
        "kdim_vdim": ({"batch_first": True, "kdim": 6, "vdim": 5}, kdim_vdim),
        "unbatched": ({}, unbatched),
        "no_bias": ({"bias": False}, seq_first),
    }
    return cases[name]


MHA_CASES = [
    "seq_first",
    "causal_float_mask",
    "bool_mask_and_padding",
    "finite_float_bias",
    "kdim_vdim",
    "unbatched",
    "no_bias",
]


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_records_the_used_logits_and_clips_them_to_tau(case):
    module_kwargs, build = _mha_case(case)
    mha = make_mha(**module_kwargs)
    args, kwargs, query, key, used = build(mha)
    want = reference_max_logits(*mha_qk(mha, query, key), used)
    if used is not None:
        assert not torch.equal(reference_max_logits(*mha_qk(mha, query, key)), want)
    tau = want.min().item() / 2  # every head is clipped
    groups = muon_param_groups(mha, last_linear_is_head=False)
    opt = MuonClip(groups, lr=0.0, adamw_lr=0.0, qk_clip_tau=tau)
    assert opt.watch(mha) == [""]
    w_q = mha.in_proj_weight if mha.in_proj_weight is not None else mha.q_proj_weight
    out = mha(*args, **kwargs)[0]
    torch.testing.assert_close(stat(opt, w_q, "qk_max_logit"), want, rtol=1e-14, atol=0)
    out.square().mean().backward()
    opt.step()  # lr 0: only the clip moves q and k (separate weights for kdim_vdim)
    torch.testing.assert_close(stat(opt, w_q), want, rtol=1e-14, atol=0)
    after = reference_max_logits(*mha_qk(mha, query, key), used)
    torch.testing.assert_close(after, torch.full_like(after, tau), rtol=1e-12, atol=0)


def test_registry_watches_the_attention_of_a_transformer_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=DTYPE)
    opt = create_optimizer("muonclip", layer, qk_clip_tau=1e-3)
    x = seeded(2, 5, 8, seed=41)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=DTYPE)
    used = torch.ones(5, 5, dtype=torch.bool).tril()
    want = reference_max_logits(*mha_qk(layer.self_attn, x, x), used)
    before = layer.self_attn.in_proj_weight.detach().clone()
    layer(x, src_mask=mask, is_causal=True).square().mean().backward()
    opt.step()
    torch.testing.assert_close(stat(opt, layer.self_attn.in_proj_weight), want, rtol=1e-14, atol=0)
    assert not torch.equal(layer.self_attn.in_proj_weight, before)


@pytest.mark.parametrize("causal", [True, False])
def test_a_fused_linear_given_explicitly(causal):
    torch.manual_seed(0)
    qkv = nn.Linear(6, 3 * 8, dtype=DTYPE)
    opt = MuonClip([{"params": [qkv.weight]}, {"params": [qkv.bias], "use_muon": False}])
    assert opt.watch(qkv, num_heads=2, causal=causal) == [""]
    x = seeded(3, 5, 6, seed=42)
    qkv(x)
    w_q, w_k, b_q, b_k = qkv_rows(qkv)
    q, k = (x @ w_q.T + b_q).unflatten(-1, (2, -1)), (x @ w_k.T + b_k).unflatten(-1, (2, -1))
    used = torch.ones(5, 5, dtype=torch.bool).tril() if causal else None
    want = reference_max_logits(q, k, used)
    torch.testing.assert_close(stat(opt, qkv.weight, "qk_max_logit"), want, rtol=1e-14, atol=0)


def test_evaluation_records_nothing_and_micro_batches_accumulate():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    w = model.blocks[0].qkv.weight
    a, b = gpt_batch(2), gpt_batch(3)
    with torch.no_grad():
        model(a)
    with torch.inference_mode():
        model(a)
    model.eval()
    model(a)
    model.train()
    assert "qk_max_logit" not in opt.state.get(w, {})
    model(a)
    model(b)
    want = torch.maximum(
        gpt_reference_max_logits(model, a)[0], gpt_reference_max_logits(model, b)[0]
    )
    torch.testing.assert_close(stat(opt, w, "qk_max_logit"), want, rtol=1e-14, atol=0)


def test_step_with_a_closure_records_its_forward_pass():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    idx = gpt_batch(4)
    want = gpt_reference_max_logits(model, idx)[0]

    def closure():
        opt.zero_grad()
        loss = model(idx, idx)[1]
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(stat(opt, model.blocks[0].qkv.weight), want, rtol=1e-14, atol=0)


def test_watch_is_idempotent_and_the_hooks_leave_with_the_optimizer():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    assert opt.watch(model) == ["blocks.0", "blocks.1"]
    assert opt.watch(model.blocks[1]) == [""]
    hooks = model.blocks[0].qkv._forward_hooks
    assert len(hooks) == 1
    copied = copy.deepcopy(opt)  # torch's state without the hooks: it watches nothing
    assert copied._qk_watched == [] and len(hooks) == 1
    del opt, copied
    gc.collect()
    model(gpt_batch(5))  # the hook finds the optimizer gone and removes itself
    assert len(hooks) == 0


def test_frozen_attention_is_left_out_by_the_registry_and_errors_watch_nothing():
    model = tiny_gpt()
    model.blocks[0].qkv.requires_grad_(False)
    opt = create_optimizer("muonclip", model)  # strict=False: blocks.0 is left out
    assert len(model.blocks[0].qkv._forward_hooks) == 0
    assert len(model.blocks[1].qkv._forward_hooks) == 1
    assert opt.watch(model, strict=False) == ["blocks.1"]
    with pytest.raises(
        ValueError, match=r"the query weight \(shape \(48, 16\)\) of _Block 'blocks.0'"
    ):
        opt.watch(model)
    # one layer the optimizer does not hold: nothing is watched, not even the others
    other = tiny_gpt()
    only_block_1 = MuonClip(muon_param_groups(other.blocks[1]))
    with pytest.raises(ValueError, match=r"_Block 'blocks\.0' is not among"):
        only_block_1.watch(other)
    assert all(len(b.qkv._forward_hooks) == 0 for b in other.blocks)


# -- 5. checkpoints ------------------------------------------------------------------------


def assert_same_state_dict(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys()
        for key, value in state.items():
            assert torch.equal(value, b["state"][pid][key]), (pid, key)


def test_state_dict_resume_is_bit_identical():
    def fresh():
        model = tiny_gpt(seed=3)
        scale_head(model.blocks[0], 1, 40.0)
        return model, create_optimizer("muonclip", model, qk_clip_tau=0.5, weight_decay=0.1)

    def accumulate(model, step):  # one micro-batch of the next step
        model(gpt_batch(100 + step), gpt_batch(200 + step))[1].backward()

    model, opt = fresh()
    clipped = 0
    for step in range(10):
        gpt_step(model, opt, gpt_batch(step))
        clipped += int((stat(opt, model.blocks[0].qkv.weight) > 0.5).sum())
    assert clipped > 0, "the run must clip"
    opt.zero_grad()
    accumulate(model, 10)  # saved mid-step: the running max holds this micro-batch
    running = stat(opt, model.blocks[0].qkv.weight, "qk_max_logit")
    assert torch.isfinite(running).all()
    buffer = io.BytesIO()
    grads = [p.grad.clone() for p in model.parameters()]
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, resumed_opt = fresh()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    assert_same_state_dict(resumed_opt.state_dict(), opt.state_dict())  # statistics included
    for p, g in zip(resumed.parameters(), grads, strict=True):
        p.grad = g.clone()

    def finish(m, o):
        accumulate(m, 11)
        o.step()
        for step in range(11, 20):
            gpt_step(m, o, gpt_batch(step))

    finish(model, opt)
    finish(resumed, resumed_opt)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_same_state_dict(opt.state_dict(), resumed_opt.state_dict())


def test_a_muon_checkpoint_loads_and_a_fresh_state_dict_round_trips():
    model = tiny_gpt()
    muon = create_optimizer("muon", model)
    gpt_step(model, muon, gpt_batch(6))
    opt = create_optimizer("muonclip", model, qk_clip_tau=7.0)
    opt.load_state_dict(muon.state_dict())
    assert [g["qk_clip_tau"] for g in opt.param_groups] == [7.0, 7.0]
    gpt_step(model, opt, gpt_batch(7))
    # a state dict saved after a forward pass but before any step holds only statistics
    fresh = create_optimizer("muonclip", model)
    model(gpt_batch(8))
    saved = fresh.state_dict()
    assert set(saved["state"][0]) == {"qk_max_logit", "qk_last_max_logit"}
    again = create_optimizer("muonclip", model)
    again.load_state_dict(saved)
    assert torch.equal(
        stat(again, model.blocks[0].qkv.weight, "qk_max_logit"), saved["state"][0]["qk_max_logit"]
    )


# -- 6. validation -------------------------------------------------------------------------


def _raises(message, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert str(info.value) == message


def test_invalid_hyperparameters():
    params = [nn.Parameter(torch.zeros(3, 4))]
    for tau in (-1, 0, math.nan):
        _raises(
            f"Invalid qk_clip_tau: {tau} (expected qk_clip_tau > 0)",
            MuonClip,
            params,
            qk_clip_tau=tau,
        )
    for tau in (True, "100"):
        _raises(
            f"Invalid qk_clip_tau: {tau!r} (expected a number, qk_clip_tau > 0; got "
            f"{type(tau).__name__})",
            MuonClip,
            params,
            qk_clip_tau=tau,
        )
    for alpha in (-0.1, 1.5):
        _raises(
            f"Invalid qk_clip_alpha: {alpha} (expected 0 <= qk_clip_alpha <= 1)",
            MuonClip,
            params,
            qk_clip_alpha=alpha,
        )
    _raises(
        "Invalid qk_clip_alpha: None (expected a number, 0 <= qk_clip_alpha <= 1; got NoneType)",
        MuonClip,
        params,
        qk_clip_alpha=None,
    )
    _raises(
        "Invalid qk_clip_tau: -1 (expected qk_clip_tau > 0)",
        MuonClip,
        [{"params": params, "qk_clip_tau": -1}],
    )
    opt = MuonClip(params)
    extra = nn.Parameter(torch.zeros(2))
    _raises(
        "Invalid qk_clip_alpha: 2 (expected 0 <= qk_clip_alpha <= 1)",
        opt.add_param_group,
        {"params": [extra], "use_muon": False, "qk_clip_alpha": 2},
    )
    assert len(opt.param_groups) == 1


class _NoCausalFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.n_head = 2


def test_invalid_modules_name_the_argument_and_the_value():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    _raises(
        "Invalid module: Sequential has no attention layer to watch (expected "
        f"{muonclip_module._WATCHABLE})",
        opt.watch,
        nn.Sequential(nn.Linear(4, 4)),
    )
    assert opt.watch(nn.Sequential(nn.Linear(4, 4)), strict=False) == []
    _raises("Invalid module: a str (expected an nn.Module)", opt.watch, "blocks")
    wrapped = nn.ModuleDict({"attn": _NoCausalFlag()})
    _raises(
        "Invalid module: _NoCausalFlag 'attn' has qkv and n_head but is_causal=None "
        "(expected a bool is_causal)",
        MuonClip(muon_param_groups(wrapped)).watch,
        wrapped,
    )
    bad_heads = nn.ModuleDict({"block": _Block(16, 3)})
    _raises(
        "Invalid num_heads: 3 (expected a divisor of the attention dimension 16 of _Block 'block')",
        MuonClip(muon_param_groups(bad_heads)).watch,
        bad_heads,
    )
    mha = make_mha()
    _raises(
        "Invalid module: the query weight (shape (24, 8)) of MultiheadAttention is not among "
        "the optimizer's parameters (QK-clip rescales it, so the optimizer must hold it)",
        opt.watch,
        mha,
    )
    only_weight = MuonClip([mha.in_proj_weight])
    _raises(
        "Invalid module: the query bias (shape (24,)) of MultiheadAttention is not among "
        "the optimizer's parameters (QK-clip rescales it, so the optimizer must hold it)",
        only_weight.watch,
        mha,
    )
    with_bias_kv = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    _raises(
        "Invalid module: MultiheadAttention with add_bias_kv=True (expected add_bias_kv=False: "
        "its learned bias_k is a key QK-clip does not rescale)",
        MuonClip(muon_param_groups(with_bias_kv)).watch,
        with_bias_kv,
    )
    _raises(
        "Invalid num_heads: 2 (num_heads and causal describe a fused q|k|v nn.Linear; a "
        "MultiheadAttention is not one)",
        MuonClip(muon_param_groups(mha)).watch,
        mha,
        num_heads=2,
    )
    linear = nn.Linear(4, 10)
    lin_opt = MuonClip([{"params": [linear.weight]}, {"params": [linear.bias], "use_muon": False}])
    _raises(
        "Invalid causal: None (expected True or False for a fused q|k|v nn.Linear)",
        lin_opt.watch,
        linear,
        num_heads=2,
    )
    _raises(
        "Invalid module: Linear(in_features=4, out_features=10, bias=True) (expected a fused "
        "q|k|v nn.Linear, out_features = 3 d)",
        lin_opt.watch,
        linear,
        num_heads=2,
        causal=True,
    )
    _raises(
        "Invalid num_heads: 0 (expected an integer >= 1)",
        opt.watch,
        model.blocks[0].qkv,
        num_heads=0,
        causal=True,
    )
    _raises(
        "Invalid module: Linear has the query weight of the layer already watched as 'blocks.0'",
        opt.watch,
        model.blocks[0].qkv,
        num_heads=2,
        causal=True,
    )


def test_invalid_state_dicts_leave_the_optimizer_as_it_was():
    model = tiny_gpt()
    opt = create_optimizer("muonclip", model)
    gpt_step(model, opt, gpt_batch(9))
    saved = opt.state_dict()
    target = create_optimizer("muonclip", model)
    bad = copy.deepcopy(saved)
    bad["state"][0]["qk_max_logit"] = torch.zeros(3)
    _raises(
        "Invalid state_dict: qk_max_logit of parameter 0 of param group 0 (shape (48, 16)) is "
        "(3,), expected a floating "
        "tensor of shape (2,)",
        target.load_state_dict,
        bad,
    )
    bad = copy.deepcopy(saved)
    bad["param_groups"][1]["qk_clip_tau"] = 0
    _raises(
        "Invalid state_dict: param group 1: Invalid qk_clip_tau: 0 (expected qk_clip_tau > 0)",
        target.load_state_dict,
        bad,
    )
    assert len(target.state) == 0


def test_docstring_example_runs():
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(muonclip_module.MuonClip, "MuonClip", globs={}):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0
