"""MicroAdam's GPU paths: a bit-for-bit cross-check, then step time against AdamW.

Two sections, each timed and printed as a table:

(a) Correctness. A small mixed parameter list (1.8M elements in 9 tensors: matrices with
    short Top-K tail blocks, an odd element count, tiny and 0-d tensors; float32 and
    bfloat16; one param group per dtype and rounding, nearest and stochastic) is stepped
    12 times on identical gradients by every MicroAdam path: the pure-PyTorch step on CPU
    copies (``fused=False``, the reference), and on ``--device`` the eager step
    (``fused="eager"``), the torch.compile'd step (``fused="compiled"``) and the Triton
    kernel (``fused="triton"``); on a CPU device also the fused CPU kernel (``fused=True``),
    the one real cross-check there. After every step each path's ``window_indices``,
    ``window_values``, ``ef_codes``, ``ef_min``, ``ef_max``, ``rng_seed`` and ``step`` must
    equal the reference's bit for bit, and its parameters must be within ``--max-ulp``
    units in the last place or within 1e-6 of their scale (``param_error``: near zero a
    rounding of ``lr * u`` that two paths do differently is many ulps). Gradients have
    distinct magnitudes inside every Top-K block
    (drawn without replacement from the values the dtype represents), and before each
    step the few entries whose corrected gradient (gradient plus decoded error) would tie
    at a Top-K boundary are nudged by an ulp or two, so no path may legitimately pick
    other indices than the reference.

(b) Speed. On the parameter lists of an OPT-1.3B-shaped model in float32 and a
    Llama-2-7B-shaped model in bfloat16 (shapes from the model configs, no model is built;
    parameters allocated on the device, one synthetic gradient per parameter, set as
    ``p.grad`` before every step), each MicroAdam path (Triton, compiled) is built, warmed
    up (``--warmup`` rounds, compilation included), then timed over ``--steps`` rounds;
    each round steps MicroAdam, ``AdamW(fused=True)`` and ``AdamW(foreach=True)`` once each
    in a rotating order, every step timed by a pair of CUDA events and synchronised. The
    eager path is timed on one float32 tensor of 100M elements only, with the same two
    baselines. Reported: median step time, the ratio to fused AdamW of the same rounds
    with the target next to it, the peak scratch memory of a step (``max_memory_allocated``
    during the step minus ``memory_allocated`` before it, largest over the timed steps),
    the peak allocated memory, and the optimizer-state bytes per parameter
    (``microadam.memory``, which counts AdamW's state the same way). When the free memory
    cannot hold both AdamW states besides MicroAdam's (or a step runs out of memory),
    foreach AdamW is timed in a separate pass against fused AdamW, and the output says so.

Work runs in child processes (this script with ``--unit``): (a) in one, and again in one
per path if that one crashes; (b) in one per case and path. A path that crashes its
process (an inductor assertion; a Triton kernel's illegal memory access, which poisons
the CUDA context for everything after it) is so reported as crashed, with the last lines
of its stderr, and the other paths still run; ``--no-isolate`` runs all in this process.
A path that does not apply (``ValueError`` at construction, ``RuntimeError`` at its first
step) is reported as "unavailable: <reason>".

Exit status: 0 when every available path agreed in (a) and ran in (b); 1 when one
disagreed, failed or crashed; 2 for bad usage. Targets are printed, never enforced.

Needs only torch (Triton for the Triton path) and this package (``pip install -e .
--no-deps``). Meant to take under 6 minutes on one H100/H200::

    python benchmarks/gpu_speed.py --out results/      # gpu_speed.json, gpu_speed.md
    python benchmarks/gpu_speed.py --skip-7b --paths triton --steps 10 --warmup 5
    python benchmarks/gpu_speed.py --smoke --device cpu    # tiny shapes: the logic only

``--smoke`` scales every case down (hidden size 64, two layers, 1M elements for the eager
case; a quarter of the check's elements) so that the script runs on a CPU in well under a
minute; on a CPU device steps are timed with ``time.perf_counter`` and memory is not
measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from microadam import MicroAdam
from microadam.compress.quant import dequantize
from microadam.compress.topk import TopKLayout, topk_layout
from microadam.memory import state_bytes_per_param

SEED = 1234
LR = 1e-3
CHECK_WEIGHT_DECAY = 0.01
MiB = 2**20
GiB = 2**30
# The keys of MicroAdam's state compared bit for bit (those present in the reference).
STATE_KEYS = ("window_indices", "window_values", "ef_codes", "ef_min", "ef_max", "rng_seed")
# The ``fused=`` values tried for each path, in order: the first that constructs is used.
# "eager" falls back to False (the same pure step) where the library does not know it yet.
FUSED_ARGS: dict[str, tuple[Any, ...]] = {
    "eager": ("eager", False),
    "compiled": ("compiled",),
    "triton": ("triton",),
    "cpu_fused": (True,),
}
# Targets: MicroAdam's step time over fused AdamW's, per path.
TARGETS = {"triton": 1.0, "compiled": 2.5, "eager": 15.0}
ALL_PATHS = ("triton", "compiled", "eager")
# Statuses that make the run fail.
FAILED = ("FAIL", "error", "crashed")


# -- model shapes ------------------------------------------------------------------------


def opt_shapes(
    vocab: int, hidden: int, layers: int, ffn: int, positions: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of an OPT decoder (learned positions, biases everywhere, two
    LayerNorms per layer, a final LayerNorm; lm_head tied to the token embedding)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embed_tokens", (vocab, hidden)),
        ("embed_positions", (positions, hidden)),
    ]
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes += [(f"{i}.{proj}.weight", (hidden, hidden)), (f"{i}.{proj}.bias", (hidden,))]
        shapes += [(f"{i}.self_attn_layer_norm.{w}", (hidden,)) for w in ("weight", "bias")]
        shapes += [(f"{i}.fc1.weight", (ffn, hidden)), (f"{i}.fc1.bias", (ffn,))]
        shapes += [(f"{i}.fc2.weight", (hidden, ffn)), (f"{i}.fc2.bias", (hidden,))]
        shapes += [(f"{i}.final_layer_norm.{w}", (hidden,)) for w in ("weight", "bias")]
    shapes += [(f"final_layer_norm.{w}", (hidden,)) for w in ("weight", "bias")]
    return shapes


def llama_shapes(
    vocab: int, hidden: int, layers: int, intermediate: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of a Llama-2 decoder (no biases, two RMSNorm weights per layer, a
    final norm, an untied lm_head)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed_tokens", (vocab, hidden))]
    for i in range(layers):
        shapes += [(f"{i}.{p}", (hidden, hidden)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        shapes += [
            (f"{i}.gate_proj", (intermediate, hidden)),
            (f"{i}.up_proj", (intermediate, hidden)),
        ]
        shapes += [(f"{i}.down_proj", (hidden, intermediate))]
        shapes += [
            (f"{i}.input_layernorm", (hidden,)),
            (f"{i}.post_attention_layernorm", (hidden,)),
        ]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    return shapes


@dataclass
class Case:
    """One timed parameter list and the MicroAdam paths timed on it."""

    key: str
    title: str
    dtype: torch.dtype
    shapes: list[tuple[str, tuple[int, ...]]]
    paths: tuple[str, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


def build_cases(smoke: bool, skip_7b: bool) -> list[Case]:
    if smoke:
        opt = opt_shapes(vocab=1000, hidden=64, layers=2, ffn=256, positions=66)
        llama = llama_shapes(vocab=1000, hidden=64, layers=2, intermediate=172)
        single = 1 << 20
    else:
        opt = opt_shapes(vocab=50272, hidden=2048, layers=24, ffn=8192, positions=2050)
        llama = llama_shapes(vocab=32000, hidden=4096, layers=32, intermediate=11008)
        single = 100_000_000
    suffix = " (smoke: scaled down)" if smoke else ""
    rows = -(-single // 1024)
    cases = [
        Case(
            "opt-1.3b",
            "OPT-1.3B-shaped, float32" + suffix,
            torch.float32,
            opt,
            ("triton", "compiled"),
        ),
        Case(
            "llama-7b",
            "Llama-2-7B-shaped, bfloat16" + suffix,
            torch.bfloat16,
            llama,
            ("triton", "compiled"),
        ),
        Case(
            "single-100m",
            f"one float32 tensor of {rows * 1024:,} elements" + suffix,
            torch.float32,
            [("weight", (rows, 1024))],
            ("eager",),
        ),
    ]
    return [c for c in cases if not (skip_7b and c.key == "llama-7b")]


# -- small helpers -----------------------------------------------------------------------


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def sync(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(err: BaseException, limit: int = 600) -> str:
    """An exception as one line: its type and message."""
    return clip(" ".join(f"{type(err).__name__}: {err}".split()), limit)


def fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or not math.isfinite(value) else format(value, spec)


def print_table(header: list[str], rows: list[list[str]], indent: str = "  ") -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(indent + line.rstrip())
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return out


class Unavailable(Exception):
    """A path that does not apply here (the library said so)."""


def make_microadam(params_or_groups: Any, path: str, **hyper: Any) -> tuple[MicroAdam, Any, str]:
    """MicroAdam for ``path``, with the first ``fused=`` value it accepts; raises
    ``Unavailable`` when construction rejects every one."""
    errors = []
    for value in FUSED_ARGS[path]:
        try:
            opt = MicroAdam(params_or_groups, fused=value, **hyper)
        except ValueError as err:
            errors.append(f"fused={value!r}: {short(err)}")
            continue
        note = f"fused={FUSED_ARGS[path][0]!r} rejected, used fused={value!r}" if errors else ""
        return opt, value, note
    raise Unavailable("; ".join(errors))


def first_step_unavailable(err: BaseException) -> bool:
    """Whether an error from a path's first step says the path does not apply here: a
    plain ``RuntimeError`` (or ``NotImplementedError``, ``ImportError``), as the library
    raises, not one of its subclasses (out of memory, CUDA errors, compiler failures)."""
    if isinstance(err, ImportError):
        return True
    return type(err) in (RuntimeError, NotImplementedError) and "CUDA error" not in str(err)


# -- (a) correctness ---------------------------------------------------------------------


def distinct_magnitudes(numel: int, block: int, dtype: torch.dtype, gen) -> torch.Tensor:
    """``numel`` values of ``dtype`` whose magnitudes differ inside every run of ``block``
    elements, with random signs.

    The magnitudes are values ``dtype`` represents in ``[2^-e, 2^e)``, ``e`` the smallest
    (at least 4) for which the range holds a block's worth (bfloat16 has 128 values per
    binade, so a block of 512 fits in 8 binades; wider ranges let the decoded error absorb
    small gradients). The range's bit patterns are cut into ``n`` equal strides; a block
    takes one pattern from each stride, the strides in a random order (one permutation,
    rotated by a random amount per block: cheaper than a permutation per block).
    """
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    n = min(block, numel)
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    per_binade = round(1 / torch.finfo(dtype).eps)  # values per binade: 2^mantissa_bits
    binades = max(8, -(-n // per_binade))
    half = -(-binades // 2)
    lo = int(torch.tensor(2.0**-half, dtype=dtype).view(int_view[dtype]).item())
    hi = int(torch.tensor(2.0**half, dtype=dtype).view(int_view[dtype]).item())
    stride = (hi - lo) // n
    blocks = -(-numel // n)
    # int32 arithmetic throughout: the largest pattern range, float32's, is 2^26.
    shift = torch.randint(0, n, (blocks, 1), generator=gen, dtype=torch.int32)
    perm = torch.randperm(n, generator=gen, dtype=torch.int32)
    order = perm[(torch.arange(n, dtype=torch.int32) + shift) % n]
    offset = torch.randint(0, stride, (blocks, n), generator=gen, dtype=torch.int32)
    bits = (lo + order * stride + offset).reshape(-1)[:numel]
    values = bits.to(int_view[dtype]).view(dtype)
    signs = torch.randint(0, 2, (numel,), generator=gen).to(dtype) * 2 - 1
    return values * signs


# Top-K block of each dtype in (a): float32 takes the default; a bfloat16 block must find
# its distinct magnitudes among the 1024 values bfloat16 has in [2^-4, 2^4) (a wider range
# lets the decoded error absorb small gradients, and the corrected gradients then tie).
CHECK_BLOCKS = {torch.float32: 4096, torch.bfloat16: 512}
CHECK_ROUNDINGS = ("nearest", "stochastic")


def check_tensors(smoke: bool = False) -> list[tuple[str, tuple[int, ...], torch.dtype, str]]:
    """(name, shape, dtype, rounding) of the correctness check's parameters; one param
    group per dtype and rounding, with the dtype's Top-K block size."""
    f32, bf16 = torch.float32, torch.bfloat16
    rows = 250 if smoke else 1000  # the two big matrices; smoke: a quarter of the elements
    specs = [
        ((rows, 1027), f32, "nearest"),
        ((rows // 3, 777), bf16, "nearest"),  # an odd count: half a byte of codes at the end
        ((5,), f32, "nearest"),
        ((), f32, "nearest"),
        ((rows // 2, 999), bf16, "stochastic"),
        ((64, 32, 3, 3), f32, "stochastic"),
        ((4097,), f32, "stochastic"),
        ((), bf16, "stochastic"),
        ((7,), bf16, "nearest"),
    ]
    out = []
    for shape, dtype, rounding in specs:
        numel, block = math.prod(shape), CHECK_BLOCKS[dtype]
        dims = "x".join(map(str, shape)) or "0-d"
        tail = f", tail {numel % block}" if numel > block and numel % block else ""
        name = f"{str(dtype).removeprefix('torch.')} {dims} ({rounding}{tail})"
        out.append((name, shape, dtype, rounding))
    return out


@dataclass
class CheckPath:
    path: str
    device: str
    opt: MicroAdam | None = None
    params: list[torch.Tensor] = field(default_factory=list)
    fused_arg: Any = None
    status: str = "pass"  # pass, FAIL, error, unavailable (crashed: set by the parent)
    detail: str = ""
    note: str = ""
    steps: int = 0
    max_ulp: float = 0.0
    max_error: float = 0.0  # largest |difference| / max(1, largest |reference parameter|)


def param_error(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest absolute difference of two parameters, relative to max(1, max |y|): the
    ulp distance alone flags values near zero, where a rounding of ``lr * u`` that the
    paths do differently (a fused multiply-add or two roundings; GPU scatter-adds summing
    in another order) is many ulps of the parameter."""
    if x.numel() == 0:
        return 0.0
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return float((x - y).abs().max()) / max(1.0, float(y.abs().max()))


def check_paths(paths: list[str], device: torch.device) -> list[str]:
    """The paths (a) compares with the reference: those asked for, and on a CPU device
    the fused CPU kernel."""
    out = [p for p in ("eager", "compiled", "triton") if p in paths]
    return [*out, "cpu_fused"] if device.type == "cpu" else out


def run_check(
    device: torch.device, paths: list[str], steps: int, max_ulp: float, smoke: bool
) -> dict[str, Any]:
    """Section (a) for ``paths``, stepped in lockstep with one run of the reference;
    returns its JSON record, without the table. A path stops at its first disagreement."""
    specs = check_tensors(smoke)
    gen = torch.Generator().manual_seed(SEED)
    init = [(torch.randn(s, generator=gen) * 0.02).to(dt) for _, s, dt, _ in specs]
    grads = []
    for _ in range(steps):
        grads.append(
            [
                (distinct_magnitudes(math.prod(s), CHECK_BLOCKS[dt], dt, gen) * 2.0**-6).reshape(s)
                for _, s, dt, _ in specs
            ]
        )
    hyper = dict(lr=LR, weight_decay=CHECK_WEIGHT_DECAY)
    keys = [(dt, r) for dt in CHECK_BLOCKS for r in CHECK_ROUNDINGS]
    keys = [k for k in keys if any((dt, r) == k for _, _, dt, r in specs)]

    def build(path: str, dev: torch.device) -> CheckPath:
        cp = CheckPath(path=path, device=str(dev))
        cp.params = [torch.nn.Parameter(t.clone().to(dev)) for t in init]
        groups = [
            {
                "params": [
                    p for p, (_, _, dt, r) in zip(cp.params, specs, strict=True) if (dt, r) == k
                ],
                "rounding": k[1],
                "topk_block_size": CHECK_BLOCKS[k[0]],
            }
            for k in keys
        ]
        if path == "cpu_pure":
            cp.opt, cp.fused_arg = MicroAdam(groups, fused=False, **hyper), False
            return cp
        try:
            cp.opt, cp.fused_arg, cp.note = make_microadam(groups, path, **hyper)
        except Unavailable as err:
            cp.status, cp.detail = "unavailable", str(err)
        return cp

    cpu = torch.device("cpu")
    reference = build("cpu_pure", cpu)
    others = [build(path, cpu if path == "cpu_fused" else device) for path in paths]

    def step(cp: CheckPath, t: int) -> None:
        assert cp.opt is not None
        for p, g in zip(cp.params, grads[t], strict=True):
            p.grad = g.to(p.device)
        if t == 0:
            torch.manual_seed(SEED)  # stochastic rounding seeds are drawn at the first step
        cp.opt.step()
        sync(torch.device(cp.device))

    assert reference.opt is not None
    group_of = {id(p): g for g in reference.opt.param_groups for p in g["params"]}
    nudged = 0
    for t in range(steps):
        if not any(cp.status == "pass" for cp in others):
            break  # nothing left to compare
        # This step's gradients, made tie-free against the reference's state (which every
        # path that agrees so far shares).
        for p, g in zip(reference.params, grads[t], strict=True):
            nudged += untie_(g, reference.opt.state[p], group_of[id(p)])
        step(reference, t)
        for cp in others:
            if cp.status != "pass":
                continue
            try:
                step(cp, t)
            except Exception as err:
                if t == 0 and first_step_unavailable(err):
                    cp.status, cp.detail = "unavailable", short(err)
                else:
                    cp.status, cp.detail = "error", f"step {t + 1}: {short(err)}"
                cp.opt = None
                continue
            cp.steps = t + 1
            problems = []
            for i, (p, q) in enumerate(zip(cp.params, reference.params, strict=True)):
                got, want = cp.opt.state[p], reference.opt.state[q]
                for key in STATE_KEYS:
                    if key not in want:
                        continue
                    if key not in got:
                        problems.append(f"{specs[i][0]}: no {key}")
                        continue
                    diff = bit_differences(got[key], want[key])
                    if diff is not None:
                        problems.append(f"{specs[i][0]}: {key}: {diff}")
                if "step" not in got or float(got["step"]) != float(want["step"]):
                    problems.append(f"{specs[i][0]}: step {got.get('step')}")
                cp.max_ulp = max(cp.max_ulp, ulp_distance(p, q))
                cp.max_error = max(cp.max_error, param_error(p, q))
            if cp.max_ulp > max_ulp and cp.max_error > MAX_PARAM_ERROR:
                problems.append(
                    f"parameters differ by {cp.max_ulp:g} ulp and {cp.max_error:.1e} "
                    f"relative to their scale (allowed: {max_ulp:g} ulp or {MAX_PARAM_ERROR:g})"
                )
            if problems:
                cp.status = "FAIL"
                cp.detail = f"step {t + 1}: " + "; ".join(problems[:3])
                if len(problems) > 3:
                    cp.detail += f"; and {len(problems) - 3} more"
    return {
        "reference": "cpu_pure",
        "steps": steps,
        "max_ulp_allowed": max_ulp,
        "num_elements": sum(math.prod(s) for _, s, _, _ in specs),
        "tensors": [
            {"name": n, "shape": list(s), "dtype": str(d), "rounding": r} for n, s, d, r in specs
        ],
        "paths": [
            {
                "path": cp.path,
                "device": cp.device,
                "fused_arg": None if cp.fused_arg is None else repr(cp.fused_arg),
                "status": cp.status,
                "steps": cp.steps,
                "max_ulp": cp.max_ulp,
                "max_param_error": cp.max_error,
                "detail": cp.detail,
                "note": cp.note,
                "gradient_entries_nudged": nudged,
            }
            for cp in others
        ],
    }


# A parameter passes within --max-ulp, or within this relative error (see param_error).
MAX_PARAM_ERROR = 1e-6

CHECK_HEADER = [
    "path",
    "fused=",
    "device",
    "status",
    "state bit-exact",
    "max param ulp",
    "max param error",
    "note",
]


def check_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = [["cpu_pure", "False", "cpu", "reference", "-", "-", "-", ""]]
    for p in record["paths"]:
        exact = {"pass": "yes", "FAIL": "no"}.get(p["status"], "-")
        ulp = fmt(p["max_ulp"], "g") if p["steps"] else "-"
        error = f"{p.get('max_param_error', 0.0):.1e}" if p["steps"] else "-"
        status = p["status"]
        if status == "unavailable":
            status = clip(f"unavailable: {p['detail']}", 110)
        if p["status"] == "pass" and p["steps"] < record["steps"]:
            status = f"pass ({p['steps']} steps)"
        detail = p["detail"] if p["status"] in FAILED else ""
        note = clip("; ".join(x for x in (p["note"], detail) if x), 400)
        fused = p["fused_arg"] or "-"
        rows.append([p["path"], fused, p["device"], status, exact, ulp, error, note])
    return rows


def boundary_ties(mag: torch.Tensor, layout: TopKLayout) -> torch.Tensor:
    """Mask of the elements of ``mag`` (flat magnitudes) whose block's k-th and (k+1)-th
    largest magnitudes are equal and that hold that value: where Top-K may pick either."""
    mask = torch.zeros_like(mag, dtype=torch.bool)
    full = layout.num_full * layout.block_size
    segments = (
        (0, layout.num_full, layout.block_size, layout.k_block),
        (full, 1 if layout.tail else 0, layout.tail, layout.k_tail),
    )
    for start, rows, width, k in segments:
        if rows == 0 or k == 0 or k >= width:
            continue
        blocks = mag[start : start + rows * width].view(rows, width)
        top = blocks.topk(k + 1, dim=1).values
        kth = top[:, k - 1 : k]
        tied = (kth == top[:, k : k + 1]) & (blocks == kth)
        mask[start : start + rows * width] = tied.reshape(-1)
    return mask


def untie_(grad: torch.Tensor, state: dict, group: dict) -> int:
    """Nudge entries of ``grad`` (in place, by whole ulps) until the corrected gradient
    ``grad + decoded error`` of the next step, computed as the pure step does from the
    reference's ``state``, has no tie at any Top-K boundary; returns the entries nudged.

    Distinct gradient magnitudes rule out ties at the first step only: later the decoded
    error (16 levels per bucket) is added, and on bfloat16's grid sums do coincide (a few
    blocks in a thousand). In a tied block the 2nd, 3rd, ... tied entries move 1, 2, ...
    ulps up in magnitude; repeated until no tie is left."""
    numel = grad.numel()
    layout = topk_layout(numel, group["topk_block_size"], group["density"])
    error = None
    if group["error_feedback"] and "ef_codes" in state:
        error = dequantize(
            state["ef_codes"],
            state["ef_min"],
            state["ef_max"],
            numel,
            group["quant_block_size"],
            group["quant_bits"],
            torch.float32,
        )
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    bits = grad.view(-1).view(int_view[grad.dtype])
    nudged = 0
    for _ in range(64):
        a = grad.reshape(-1).to(torch.float32, copy=True)
        if error is not None:
            a += error
        idx = boundary_ties(a.abs(), layout).nonzero().view(-1)
        if idx.numel() == 0:
            return nudged
        block = (idx // layout.block_size).clamp_(max=layout.num_full)
        first = torch.ones_like(block, dtype=torch.bool)
        first[1:] = block[1:] != block[:-1]
        starts = torch.arange(idx.numel()).masked_fill(~first, 0).cummax(0).values
        rank = torch.arange(idx.numel()) - starts  # 0 for the first tied entry of a block
        bits[idx] += rank.to(bits.dtype)  # sign-magnitude: + moves away from zero
        nudged += int((rank > 0).sum())
    raise RuntimeError("could not make the check's gradients tie-free in 64 rounds")


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest distance between ``x`` and ``y`` in units in the last place (inf when only
    one of them is NaN somewhere)."""
    x, y = x.detach().reshape(-1).cpu(), y.detach().reshape(-1).cpu()
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    if x.numel() == 0 or torch.equal(x.view(int_view[x.dtype]), y.view(int_view[y.dtype])):
        return 0.0
    nan_x, nan_y = x.isnan(), y.isnan()
    if not torch.equal(nan_x, nan_y):
        return math.inf
    bits = 8 * x.element_size()
    magnitude = (1 << (bits - 1)) - 1

    def line(t: torch.Tensor) -> torch.Tensor:
        # Sign-magnitude bit patterns onto a monotone integer line (+0 and -0 meet at 0).
        i = t.view(int_view[t.dtype]).to(torch.int64)
        return torch.where(i < 0, -(i & magnitude), i)

    distance = (line(x) - line(y)).abs().masked_fill_(nan_x, 0)
    return float(distance.max())


def bit_differences(got: torch.Tensor, expected: torch.Tensor) -> str | None:
    """``None`` when both tensors hold the same bits, else what differs."""
    if got.dtype != expected.dtype or tuple(got.shape) != tuple(expected.shape):
        return f"{got.dtype} {tuple(got.shape)} instead of {expected.dtype} {tuple(expected.shape)}"
    a = got.detach().cpu().contiguous().reshape(-1)
    b = expected.detach().cpu().contiguous().reshape(-1)
    if a.dtype.is_floating_point:
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(view), b.view(view)
    diff = (a != b).nonzero().reshape(-1)
    if diff.numel() == 0:
        return None
    return f"{diff.numel()} of {a.numel()} entries differ (first at {diff[:3].tolist()})"


# -- (b) speed ---------------------------------------------------------------------------


class Timer:
    """Times one optimizer step: CUDA events (synchronised) on a GPU, perf_counter on the
    CPU; on a GPU also the step's peak scratch and peak allocated memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = is_cuda(device)
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, opt: torch.optim.Optimizer) -> tuple[float, float, int | None, int | None]:
        """(event ms, wall ms, peak scratch bytes, peak allocated bytes)."""
        if not self.cuda:
            t0 = time.perf_counter()
            opt.step()
            ms = (time.perf_counter() - t0) * 1e3
            return ms, ms, None, None
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        self.start.record()
        opt.step()
        self.end.record()
        self.end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated(self.device)
        return self.start.elapsed_time(self.end), wall, peak - before, peak


@dataclass
class Series:
    """The timed steps of one optimizer in one pass."""

    label: str
    opt: torch.optim.Optimizer | None
    pass_id: int = 0  # 1: MicroAdam's pass, 0: the baselines' own
    ms: list[float] = field(default_factory=list)
    wall_ms: list[float] = field(default_factory=list)
    scratch: list[int] = field(default_factory=list)
    peak: list[int] = field(default_factory=list)
    warmup_s: float = 0.0
    first_step_s: float | None = None


class PassFailed(Exception):
    def __init__(self, label: str, err: BaseException, first: bool) -> None:
        super().__init__(f"{label}: {short(err)}")
        self.label, self.err, self.first = label, err, first


def timed_pass(series: list[Series], params, grads, timer: Timer, warmup: int, steps: int) -> None:
    """Warm-up rounds, then timed rounds; each round steps every optimizer once, starting
    one further along each round. Raises ``PassFailed`` naming the optimizer that failed."""

    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g

    seen = set()
    for r in range(warmup + steps):
        k = r % len(series)
        for s in series[k:] + series[:k]:
            set_grads()
            t0 = time.perf_counter()
            try:
                result = timer(s.opt)
            except Exception as err:
                raise PassFailed(s.label, err, first=s.label not in seen) from err
            took = time.perf_counter() - t0
            if s.label not in seen:
                seen.add(s.label)
                s.first_step_s = took
            if r < warmup:
                s.warmup_s += took
                continue
            ms, wall, scratch, peak = result
            s.ms.append(ms)
            s.wall_ms.append(wall)
            if scratch is not None and peak is not None:
                s.scratch.append(scratch)
                s.peak.append(peak)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def allocate(case: Case, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The case's parameters (uniform in +-0.02) and one gradient each (normal, std 1e-3,
    filled in chunks), on ``device``."""
    gen = torch.Generator(device=device).manual_seed(SEED)
    params, grads = [], []
    chunk = 1 << 26
    for _, shape in case.shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=case.dtype, device=device))
        p.data.uniform_(-0.02, 0.02, generator=gen)
        g = torch.empty(shape, dtype=case.dtype, device=device)
        flat = g.view(-1)
        for s in range(0, flat.numel(), chunk):
            flat[s : s + chunk].normal_(0.0, 1e-3, generator=gen)
        params.append(p)
        grads.append(g)
    sync(device)
    return params, grads


def empty_row(case: Case, optimizer: str, path: str, **extra: Any) -> dict[str, Any]:
    row = {
        "case": case.key,
        "optimizer": optimizer,
        "path": path,
        "status": "ok",
        "reason": "",
        "note": "",
        "fused_arg": None,
        "median_ms": None,
        "wall_median_ms": None,
        "baseline_ms": None,
        "ratio": None,
        "target": TARGETS.get(path) if optimizer == "MicroAdam" else None,
        "met": None,
        "peak_scratch_mib": None,
        "peak_allocated_gib": None,
        "state_bytes_per_param": None,
        "timed_steps": 0,
        "warmup_s": None,
        "first_step_s": None,
        "times_ms": [],
        "baseline_times_ms": [],
    }
    row.update(extra)
    return row


def fill_row(row: dict[str, Any], s: Series, base_ms: list[float] | None) -> None:
    """Measurements of ``s`` into ``row``, the ratio against ``base_ms``."""
    row["median_ms"] = median(s.ms)
    row["wall_median_ms"] = median(s.wall_ms)
    row["times_ms"] = [round(x, 4) for x in s.ms]
    row["timed_steps"] = len(s.ms)
    row["warmup_s"] = s.warmup_s
    row["first_step_s"] = s.first_step_s
    if s.scratch:
        row["peak_scratch_mib"] = max(s.scratch) / MiB
        row["peak_allocated_gib"] = max(s.peak) / GiB
    if s.opt is not None:
        row["state_bytes_per_param"] = state_bytes_per_param(s.opt)
    if base_ms and s.ms:
        row["baseline_times_ms"] = [round(x, 4) for x in base_ms]
        row["baseline_ms"] = median(base_ms)
        row["ratio"] = row["median_ms"] / row["baseline_ms"]
        if row["target"] is not None:
            row["met"] = row["ratio"] <= row["target"]


def run_case(
    case: Case, path: str | None, args: argparse.Namespace, device: torch.device, baselines: str
) -> dict[str, Any]:
    """One unit of (b): MicroAdam's ``path`` (None: none) on ``case``, interleaved with the
    AdamW baselines; ``baselines`` says when the AdamW optimizers get a pass of their own:
    "always", "fallback" (when this unit timed not both of them otherwise) or "never".
    Returns {"rows": [MicroAdam's row], "baselines": [AdamW rows], "notes": [...]}."""
    timer = Timer(device)
    n = case.numel
    size = torch.tensor([], dtype=case.dtype).element_size()
    notes: list[str] = []
    t0 = time.perf_counter()
    params, grads = allocate(case, device)
    say(
        f"    [{path or 'baselines'}] {n * size / GiB:.2f} GiB of parameters and as much of "
        f"gradients allocated in {time.perf_counter() - t0:.1f} s"
    )

    adam = dict(lr=LR, weight_decay=0.0)
    adamw: dict[str, torch.optim.Optimizer | None] = {
        "fused": torch.optim.AdamW(params, fused=True, **adam),
        "foreach": None,
    }
    separate = args.separate_foreach
    if separate:
        notes.append("foreach AdamW in a separate pass (--separate-foreach)")
    elif is_cuda(device) and path is not None:
        free, _ = torch.cuda.mem_get_info(device)
        # Two AdamW states, foreach's temporaries (about one parameter copy), MicroAdam's
        # state (under 1 B/param) and its scratch, and a margin.
        need = 5 * n * size + 2 * n + 2 * GiB
        if need > free:
            separate = True
            notes.append(
                f"foreach AdamW in a separate pass: {free / GiB:.1f} GiB free, "
                f"{need / GiB:.1f} GiB needed to interleave it"
            )
    if not separate:
        adamw["foreach"] = torch.optim.AdamW(params, foreach=True, **adam)

    def baseline_series(pass_id: int) -> list[Series]:
        return [Series(label, opt, pass_id) for label, opt in adamw.items() if opt is not None]

    rows: list[dict[str, Any]] = []
    timed: dict[str, list[Series]] = {"fused": [], "foreach": []}
    if path is not None:
        row = empty_row(case, "MicroAdam", path)
        t_path = time.perf_counter()
        micro = None
        for attempt in (1, 2):
            try:
                micro, row["fused_arg"], row["note"] = make_microadam(params, path, **adam)
            except Unavailable as err:
                row["status"], row["reason"] = "unavailable", str(err)
                break
            series = [Series("microadam", micro, 1), *baseline_series(1)]
            try:
                timed_pass(series, params, grads, timer, args.warmup, args.steps)
            except PassFailed as failed:
                oom = isinstance(failed.err, torch.cuda.OutOfMemoryError)
                if oom and adamw["foreach"] is not None and attempt == 1:
                    # Again without foreach AdamW, which gets a pass of its own below.
                    del micro, series, failed
                    adamw["foreach"] = None
                    separate = True
                    free_memory(device)
                    notes.append(
                        "out of memory with three optimizers: foreach AdamW moved "
                        "to a separate pass"
                    )
                    say(f"    [{path}] {notes[-1]}; again")
                    continue
                if (
                    failed.label == "microadam"
                    and failed.first
                    and first_step_unavailable(failed.err)
                ):
                    row["status"], row["reason"] = "unavailable", short(failed.err)
                else:
                    row["status"], row["reason"] = "error", str(failed)
                break
            fill_row(row, series[0], series[1].ms)
            for s in series[1:]:
                timed[s.label].append(s)
            break
        row["fused_arg"] = None if row["fused_arg"] is None else repr(row["fused_arg"])
        del micro
        free_memory(device)
        took = time.perf_counter() - t_path
        if row["status"] == "ok":
            say(
                f"    [{path}] {row['median_ms']:.3f} ms median, {row['ratio']:.2f}x fused AdamW "
                f"(target <= {row['target']:g}x); warm-up {row['warmup_s']:.1f} s, first step "
                f"{row['first_step_s']:.1f} s; {took:.1f} s in all"
            )
        else:
            say(f"    [{path}] {row['status']}: {row['reason']} ({took:.1f} s)")
        rows.append(row)

    missing = not (timed["fused"] and timed["foreach"])
    if baselines == "always" or (baselines == "fallback" and missing):
        t_pass = time.perf_counter()
        if adamw["foreach"] is None:
            adamw["foreach"] = torch.optim.AdamW(params, foreach=True, **adam)
        series = baseline_series(0)
        try:
            timed_pass(series, params, grads, timer, args.warmup, args.steps)
            for s in series:
                timed[s.label].append(s)
            say(
                f"    [baselines] fused and foreach AdamW on their own: "
                f"{time.perf_counter() - t_pass:.1f} s"
            )
        except PassFailed as failed:
            say(f"    [baselines] failed: {failed}")
            rows.append(empty_row(case, "AdamW", failed.label, status="error", reason=str(failed)))
    base_rows = []
    for label, runs in timed.items():
        for s in runs:
            r = empty_row(case, "AdamW", label)
            # Each AdamW series against the fused AdamW steps of its own pass.
            fused_same = [x for x in timed["fused"] if x.pass_id == s.pass_id]
            fill_row(r, s, fused_same[0].ms if fused_same else None)
            r["note"] = "interleaved with MicroAdam" if s.pass_id else "baseline pass"
            base_rows.append(r)
    adamw.clear()
    del params, grads
    free_memory(device)
    return {"rows": rows, "baselines": base_rows, "notes": notes}


def merge_case(case: Case, units: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of one case from its units: MicroAdam's as measured; each AdamW baseline
    pooled over the passes it ran in, its ratio against the fused AdamW steps of the same
    passes."""
    rows: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, Any]] = {}
    for unit in units:
        for b in unit.get("baselines", []):
            r = pooled.setdefault(b["path"], empty_row(case, "AdamW", b["path"], notes=set()))
            r["times_ms"] += b["times_ms"]
            r["baseline_times_ms"] += b["baseline_times_ms"]
            r["timed_steps"] += b["timed_steps"]
            r["notes"].add(b["note"])
            for key in ("peak_scratch_mib", "peak_allocated_gib", "state_bytes_per_param"):
                if b[key] is not None:
                    r[key] = max(r[key] or 0.0, b[key])
            r["warmup_s"] = (r["warmup_s"] or 0.0) + (b["warmup_s"] or 0.0)
            r["first_step_s"] = r["first_step_s"] or b["first_step_s"]
    for label in ("fused", "foreach"):
        if label not in pooled:
            continue
        r = pooled[label]
        r["median_ms"] = median(r["times_ms"])
        r["baseline_ms"] = median(r["baseline_times_ms"])
        if r["median_ms"] and r["baseline_ms"]:
            r["ratio"] = r["median_ms"] / r["baseline_ms"]
        what = "AdamW(fused=True), the baseline" if label == "fused" else "AdamW(foreach=True)"
        r["note"] = f"{what}; " + ", ".join(sorted(r.pop("notes")))
        rows.append(r)
    for unit in units:
        rows += unit.get("rows", [])
    return rows


# -- units: each path in a process of its own ----------------------------------------------


def run_unit(unit: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run one unit in this process: "check:<path>" or "time:<case>:<path or ->:<mode>"."""
    kind, _, rest = unit.partition(":")
    if kind == "check":
        return run_check(device, rest.split(","), args.check_steps, args.max_ulp, args.smoke)
    if kind == "time":
        key, path, mode = rest.split(":")
        case = {c.key: c for c in build_cases(args.smoke, skip_7b=False)}[key]
        return run_case(case, None if path == "-" else path, args, device, mode)
    raise ValueError(f"unknown unit {unit!r}")


def child_argv(args: argparse.Namespace) -> list[str]:
    """The options a child process needs to run a unit as this process would."""
    argv = [
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--check-steps",
        str(args.check_steps),
        "--max-ulp",
        repr(args.max_ulp),
    ]
    if args.smoke:
        argv.append("--smoke")
    if args.separate_foreach:
        argv.append("--separate-foreach")
    return argv


def execute(unit: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Run a unit, in a child process unless ``--no-isolate``; a unit that crashed or timed
    out comes back as ``{"crashed": reason}``."""
    if not args.isolate:
        try:
            return run_unit(unit, args, device)
        except Exception as err:  # the unit's own failures are caught inside it
            return {"crashed": f"raised {short(err)}"}
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="gpu_speed_") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            *child_argv(args),
            "--unit",
            unit,
            "--unit-out",
            str(result),
        ]
        with log.open("w") as err_file:
            proc = subprocess.Popen(cmd, stderr=err_file, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.unit_timeout)
            except BaseException as err:  # a timeout, or Ctrl-C here (the child has its own
                # session, so the terminal's SIGINT does not reach it): end it and its workers
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not isinstance(err, subprocess.TimeoutExpired):
                    raise
                rc = None
        stderr = log.read_text(errors="replace")
        if stderr.strip():
            sys.stderr.write(stderr if stderr.endswith("\n") else stderr + "\n")
        if args.out is not None and stderr.strip():
            logs = args.out / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / (unit.replace(":", "_") + ".log")).write_text(stderr)
        if rc == 0 and result.exists():
            return json.loads(result.read_text())
    if rc is None:
        why = f"timed out after {args.unit_timeout:g} s (--unit-timeout)"
    elif rc < 0:
        why = f"killed by {signal.Signals(-rc).name}"
    else:
        why = f"exit code {rc}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    tail = " / ".join(lines[-2:])
    return {"crashed": f"{why}: {tail[-300:]}" if tail else why}


def unit_main(args: argparse.Namespace) -> int:
    """A child process: run ``args.unit`` and write its result to ``args.unit_out``."""
    device = torch.device(args.device)
    if is_cuda(device):
        torch.cuda.set_device(device if device.index is not None else 0)
    result = run_unit(args.unit, args, device)
    Path(args.unit_out).write_text(json.dumps(result, default=str))
    return 0


def check_section(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Section (a): all paths in one unit, or one unit per path if that one crashed;
    returns the merged record."""
    specs = check_tensors(args.smoke)
    record: dict[str, Any] = {
        "reference": "cpu_pure",
        "steps": args.check_steps,
        "max_ulp_allowed": args.max_ulp,
        "num_elements": sum(math.prod(s) for _, s, _, _ in specs),
        "tensors": [
            {"name": n, "shape": list(s), "dtype": str(d), "rounding": r} for n, s, d, r in specs
        ],
        "paths": [],
    }
    paths = check_paths(args.path_list, device)
    say(
        f"  {len(specs)} tensors, {record['num_elements']:,} elements (float32 with Top-K "
        "blocks of 4096, bfloat16 with blocks of 512; nearest and stochastic rounding); "
        f"paths {', '.join(paths)} in lockstep with the reference (fused=False on the CPU); "
        f"state bit for bit, parameters within {args.max_ulp:g} ulp"
    )
    # All paths in one child; when it crashes, one child per path, to tell which did.
    t0 = time.perf_counter()
    got = execute(f"check:{','.join(paths)}", args, device)
    if "crashed" not in got:
        record["paths"] = got["paths"]
        say(f"    all paths in one process: {time.perf_counter() - t0:.1f} s")
    else:
        if len(paths) > 1:
            say(
                f"    the process running all paths crashed ({got['crashed'][:120]}); "
                "again with one process per path"
            )
        for path in paths:
            t0 = time.perf_counter()
            got = execute(f"check:{path}", args, device) if len(paths) > 1 else got
            if "crashed" in got:
                entry = {
                    "path": path,
                    "device": str(device),
                    "fused_arg": None,
                    "status": "crashed",
                    "steps": 0,
                    "max_ulp": 0.0,
                    "detail": got["crashed"],
                    "note": "",
                    "gradient_entries_nudged": None,
                }
            else:
                entry = got["paths"][0]
            record["paths"].append(entry)
            say(f"    [{path}] {entry['status']} ({time.perf_counter() - t0:.1f} s)")
    nudged = [p["gradient_entries_nudged"] for p in record["paths"]]
    record["gradient_entries_nudged"] = next((x for x in nudged if x is not None), None)
    record["passed"] = not any(p["status"] in FAILED for p in record["paths"])
    return record


def time_section(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Section (b) for one case: one unit per path, then the baselines if no unit timed
    them; returns the case's record."""
    paths = [p for p in case.paths if p in args.path_list]
    units: list[dict[str, Any]] = []

    def have_baselines() -> bool:
        labels = {b["path"] for u in units for b in u.get("baselines", [])}
        return {"fused", "foreach"} <= labels

    def run(path: str | None, mode: str) -> None:
        got = execute(f"time:{case.key}:{path or '-'}:{mode}", args, device)
        if "crashed" in got:
            say(f"    [{path or 'baselines'}] crashed: {got['crashed']}")
            row = empty_row(
                case,
                "MicroAdam" if path else "AdamW",
                path or "fused",
                status="crashed",
                reason=got["crashed"],
            )
            got = {"rows": [row], "baselines": [], "notes": []}
        units.append(got)

    for i, path in enumerate(paths):
        last = i == len(paths) - 1
        run(path, "fallback" if last and not have_baselines() else "never")
    if not have_baselines():
        run(None, "always")
    notes = sorted({note for u in units for note in u.get("notes", [])})
    return {
        "key": case.key,
        "title": case.title,
        "dtype": str(case.dtype),
        "num_params": case.numel,
        "num_tensors": len(case.shapes),
        "notes": notes,
        "rows": merge_case(case, units),
    }


# -- output ------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as err:  # not installed, or broken: the Triton path will say so
        env["triton"] = f"not importable ({short(err, 80)})"
    try:
        from importlib.metadata import version

        env["microadam"] = version("microadam")
    except Exception:
        env["microadam"] = "unknown"
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / GiB, 1)
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


TIMING_HEADER = [
    "path",
    "median ms",
    "x fused AdamW",
    "target",
    "met?",
    "peak scratch MiB",
    "peak GiB",
    "state B/param",
    "note",
]


def timing_cells(r: dict[str, Any]) -> list[str]:
    name = f"{r['optimizer']} {r['path']}"
    target = f"<= {r['target']:g}x" if r["target"] is not None else "-"
    if r["status"] != "ok":
        status = clip(f"{r['status']}: {r['reason']}", 110)
        return [name, status, "-", target, "-", "-", "-", "-", r["note"]]
    met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
    return [
        name,
        fmt(r["median_ms"], ".3f"),
        fmt(r["ratio"], ".2f"),
        target,
        met,
        fmt(r["peak_scratch_mib"], ".1f", "n/a"),
        fmt(r["peak_allocated_gib"], ".2f", "n/a"),
        fmt(r["state_bytes_per_param"], ".3f"),
        r["note"],
    ]


def case_heading(case: dict[str, Any]) -> str:
    return (
        f"{case['title']}: {case['num_params']:,} parameters "
        f"({case['num_params'] / 1e9:.3f}B) in {case['num_tensors']} tensors"
    )


def write_outputs(out: Path | None, record: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_speed.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    env, args = record["environment"], record["args"]
    gpu = env["gpu"] or f"no GPU ({env.get('cpu')}, {env['torch_threads']} torch threads)"
    clock = "CUDA events, synchronised per step" if env["gpu"] else "time.perf_counter"
    lines = [
        "# MicroAdam GPU speed (benchmarks/gpu_speed.py)",
        "",
        f"- device: {env['device']}, {gpu}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
        f"microadam {env['microadam']}, Python {env['python']}, {env['cpus']} CPUs",
        f"- command: `{record['command']}`",
        f"- timing: {args['warmup']} warm-up rounds, then {args['steps']} rounds, each "
        f"stepping every optimizer once in a rotating order; {clock}; medians",
        "- sections: " + ", ".join(f"{k} {v:.1f} s" for k, v in record["sections_s"].items()),
        "",
    ]
    check = record.get("check")
    if check:
        verdict = "passed" if check["passed"] else "FAILED"
        lines += [
            f"## (a) Correctness: {check['steps']} steps against fused=False on the CPU "
            f"({check['num_elements']:,} elements): {verdict}",
            "",
        ]
        lines += [*markdown(CHECK_HEADER, check_rows(check)), ""]
    for case in record["cases"]:
        lines += [f"## {case_heading(case)}", ""]
        lines += [*markdown(TIMING_HEADER, [timing_cells(r) for r in case["rows"]]), ""]
        lines += [f"- {note}" for note in case["notes"]]
        lines += [""] if case["notes"] else []
    (out / "gpu_speed.md").write_text("\n".join(lines))


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="device of the GPU paths (default: cuda)")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds per path (default 20)")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up rounds (default 10)")
    ap.add_argument("--check-steps", type=int, default=12, help="steps of (a) (default 12)")
    ap.add_argument(
        "--max-ulp",
        type=float,
        default=2.0,
        help="largest parameter difference in (a), in ulp (default 2)",
    )
    ap.add_argument("--skip-7b", action="store_true", help="leave out the Llama-7B case")
    ap.add_argument("--skip-check", action="store_true", help="leave out section (a)")
    ap.add_argument(
        "--paths",
        default=",".join(ALL_PATHS),
        help="MicroAdam paths to check and time, of triton,compiled,eager (default: all)",
    )
    ap.add_argument(
        "--separate-foreach",
        action="store_true",
        help="time foreach AdamW in its own pass against fused AdamW",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes (hidden 64): tests the script's logic, on a CPU too",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for gpu_speed.json, gpu_speed.md and the children's logs "
        "(rewritten after each section)",
    )
    ap.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        help="run every path in this process (a crash then ends the run)",
    )
    ap.add_argument(
        "--unit-timeout",
        type=float,
        default=600.0,
        help="seconds after which a path's child process is killed (default 600)",
    )
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # a child process: run this unit
    ap.add_argument("--unit-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.path_list = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in args.path_list if p not in ALL_PATHS]
    if bad:
        ap.error(f"unknown --paths {bad} (expected some of {', '.join(ALL_PATHS)})")
    if args.steps < 1 or args.warmup < 0 or args.check_steps < 1:
        ap.error("--steps and --check-steps must be >= 1, --warmup >= 0")
    if not args.path_list:
        ap.error("--paths is empty")
    if args.unit is not None and args.unit_out is None:
        ap.error("--unit needs --unit-out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.unit is not None:
        return unit_main(args)
    device = torch.device(args.device)
    if is_cuda(device):
        if not torch.cuda.is_available():
            print(
                f"--device {args.device}: CUDA is not available here (torch "
                f"{torch.__version__}); use --device cpu (with --smoke) to test the script",
                file=sys.stderr,
            )
            return 2
        if device.index is None:
            device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        args.device = str(device)
    start = time.perf_counter()
    env = environment(device)
    given = sys.argv[1:] if argv is None else argv
    record: dict[str, Any] = {
        "environment": env,
        "command": " ".join(["python", "benchmarks/gpu_speed.py", *given]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "sections_s": {},
        "check": None,
        "cases": [],
    }
    say(
        f"MicroAdam GPU speed on {env['device']} ({env['gpu'] or 'no GPU'}): torch "
        f"{env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, microadam "
        f"{env['microadam']}" + (" [smoke: tiny shapes]" if args.smoke else "")
    )
    targets = ", ".join(f"{k} <= {v:g}x" for k, v in TARGETS.items())
    say(
        f"targets (step time over AdamW(fused=True)): {targets}; every path runs in "
        + ("a child process of its own" if args.isolate else "this process")
        + "\n"
    )

    failed = False
    if not args.skip_check:
        say(
            f"== (a) correctness: every path against the CPU pure step, {args.check_steps} steps =="
        )
        t0 = time.perf_counter()
        check = check_section(args, device)
        took = time.perf_counter() - t0
        record["check"] = check
        record["sections_s"]["check"] = took
        failed |= not check["passed"]
        print_table(CHECK_HEADER, check_rows(check))
        if check["gradient_entries_nudged"] is not None:
            say(
                f"  ({check['gradient_entries_nudged']} gradient entries nudged by an ulp or "
                "two to keep every Top-K boundary tie-free)"
            )
        say(
            f"  (a) {'passed' if check['passed'] else 'FAILED'}; took {took:.1f} s "
            f"(total {time.perf_counter() - start:.1f} s)\n"
        )
        write_outputs(args.out, record)

    for case in build_cases(args.smoke, args.skip_7b):
        paths = [p for p in case.paths if p in args.path_list]
        if not paths:
            continue
        say(
            f"== (b) speed: {case.title}; MicroAdam {', '.join(paths)} against AdamW "
            f"(fused, foreach); {args.warmup} warm-up, {args.steps} timed rounds =="
        )
        size = torch.tensor([], dtype=case.dtype).element_size()
        say(
            f"  {case.numel:,} parameters ({case.numel / 1e9:.3f}B) in {len(case.shapes)} "
            f"tensors, {case.dtype}: {case.numel * size / GiB:.2f} GiB of parameters"
        )
        t0 = time.perf_counter()
        result = time_section(case, args, device)
        took = time.perf_counter() - t0
        record["cases"].append(result)
        record["sections_s"][case.key] = took
        failed |= any(r["status"] in FAILED for r in result["rows"])
        print_table(TIMING_HEADER, [timing_cells(r) for r in result["rows"]])
        for note in result["notes"]:
            say(f"  note: {note}")
        say(f"  took {took:.1f} s (total {time.perf_counter() - start:.1f} s)\n")
        write_outputs(args.out, record)

    record["total_s"] = time.perf_counter() - start
    record["exit_code"] = int(failed)
    write_outputs(args.out, record)
    where = ""
    if args.out is not None:
        where = f"; results in {args.out}"
        if (args.out / "logs").is_dir():
            where += f", the child processes' stderr in {args.out / 'logs'}"
    say(f"done in {record['total_s']:.1f} s{where}")
    if failed:
        print("FAILED: a path disagreed, failed or crashed; see above", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
