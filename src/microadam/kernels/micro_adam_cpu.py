"""The fused CPU step of MicroAdam: build, load and call ``micro_adam_cpu.cpp``.

The kernel consumes and produces exactly the state of
:func:`microadam.optim.micro_adam.micro_adam_step_` (same tensors, dtypes and layouts, and
bit for bit the same window and error-feedback contents on tie-free inputs), so either path
can resume the other's checkpoints. See the C++ file for how it rounds.

Building. On the first fused step of a process the C++ source (shipped with the package) is
compiled with the system's C++ compiler (``$CXX``, else ``c++``) against the installed
torch, with OpenMP, for the target that ``MICROADAM_CPU_ARCH`` names (read once, at that
first step):

- ``native`` (the default): ``-march=native``, which takes the kernel's AVX-512 loops on
  a CPU that has AVX-512 and auto-vectorized portable loops elsewhere; if that does not
  compile, the compiler's default target.
- ``avx2``: ``-march=x86-64-v3`` (AVX2, FMA and F16C, no AVX-512), x86-64 only: what an
  AVX2 machine runs, to test or measure that build on an AVX-512 one.
- ``portable``: ``-march=x86-64`` (SSE2) on x86-64, the compiler's default target
  elsewhere (armv8-a, with NEON, on ARM).

Every build gives the same results, bit for bit (docs/cpu-kernel.md). The library goes
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``)
under a name that hashes the source, the flags (so the target), the torch and Python
versions and, for ``native``, the CPU, so later processes only load it. The library is
written to a temporary file and renamed into place, so concurrent processes never see half
a file and never wait on a lock. Only ``torch/library.h`` and ``ATen/Parallel.h`` are
included, which keeps the build to about 10 s (a ``torch/extension.h`` build takes about
three times as long) and needs no ninja.

If it cannot be built or loaded (no compiler, no OpenMP, an unsupported platform, a failed
compile), :func:`unavailable_reason` says why; ``MicroAdam(fused=None)`` then warns once
and uses the pure-PyTorch step for the rest of the process, ``fused=True`` raises.
``MICROADAM_DISABLE_FUSED=1`` in the environment (read once, at the first fused step)
skips the kernel altogether; an unknown ``MICROADAM_CPU_ARCH`` counts as a failed build.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from microadam.compress.topk import kept_per_block
from microadam.optim.micro_adam_state import STATE_LAYOUT

__all__ = [
    "ARCH_ENV",
    "CPU_ARCHES",
    "DISABLE_ENV",
    "MAX_UNIT",
    "SUPPORTED_DTYPES",
    "build",
    "cpu_arch",
    "micro_adam_multi_step_",
    "micro_adam_step_",
    "unavailable_reason",
    "unsupported_reason",
    "work_unit",
]

SOURCE = Path(__file__).with_name("micro_adam_cpu.cpp")
DISABLE_ENV = "MICROADAM_DISABLE_FUSED"
ARCH_ENV = "MICROADAM_CPU_ARCH"
CPU_ARCHES = ("native", "avx2", "portable")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# A work unit holds whole Top-K blocks and whole buckets: lcm(B, Q) elements (even at
# 4 bits, so that packed codes start on a byte). Small blocks are grouped to about
# TARGET_UNIT elements so per-unit overhead stays negligible; units above MAX_UNIT
# (unusual pairs such as 29056 and 100000) would need megabytes of scratch per thread and
# are left to the pure path.
TARGET_UNIT = 4096
MAX_UNIT = 1 << 20

_lock = threading.Lock()
_ops: Any = None
_failure: str | None = None
_failure_is_error = False  # False when the user disabled the kernel (nothing to warn about)
_warned = False
build_seconds: float | None = None  # wall time of this process's compile, if it compiled
build_target: str | None = None  # the -march of the build this process loads, or "default"


@functools.lru_cache(maxsize=64)  # called at every step
def work_unit(topk_block_size: int, quant_block_size: int, quant_bits: int, ef: bool) -> int:
    """Elements per work unit of the kernel for these block sizes."""
    base = topk_block_size
    if ef:
        base = math.lcm(base, quant_block_size, 2 if quant_bits == 4 else 1)
    return base * max(1, TARGET_UNIT // base)


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def cpu_arch() -> str:
    """The build target ``MICROADAM_CPU_ARCH`` asks for (one of :data:`CPU_ARCHES`).

    Raises ``ValueError`` for another value, and for ``avx2`` on a machine that is not x86-64.
    """
    arch = os.environ.get(ARCH_ENV, "").strip().lower() or "native"
    if arch not in CPU_ARCHES:
        raise ValueError(
            f"Invalid {ARCH_ENV}: {os.environ[ARCH_ENV]!r} (expected native, avx2 or portable)"
        )
    if arch == "avx2" and not _is_x86_64():
        raise ValueError(f"{ARCH_ENV}=avx2 needs an x86-64 machine, not {platform.machine()}")
    return arch


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in order, for the target of :func:`cpu_arch`: for ``native``,
    tuned for this CPU first, then the compiler's default target."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    common = [
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++20",
        "-fopenmp",  # at::parallel_for is an OpenMP region compiled into this library
        "-ffp-contract=off",  # never fuse a*b+c behind our back: rounding must match torch
        "-fno-math-errno",  # lets sqrt vectorize; results are unchanged
        "-fno-trapping-math",  # lets floor vectorize; only FP exception flags differ
        "-DNDEBUG",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-isystem{p}" for p in include_paths()),
        f"-L{lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{lib}",
    ]
    arch = cpu_arch()
    if arch == "avx2":
        return [[*common, "-march=x86-64-v3"]]
    if arch == "portable":
        return [[*common, "-march=x86-64"]] if _is_x86_64() else [common]
    return [[*common, "-march=native"], common]


def _target_of(flags: list[str]) -> str:
    return next((f.removeprefix("-march=") for f in flags if f.startswith("-march=")), "default")


def build(verbose: bool = False) -> Path:
    """Compile the kernel (or find it in the cache) and return the library's path.

    Raises ``RuntimeError`` with the compiler's complaint when no flag set compiles, and
    ``ValueError`` for a bad ``MICROADAM_CPU_ARCH`` (:func:`cpu_arch`).
    """
    global build_seconds, build_target
    cxx = os.environ.get("CXX", "c++")
    source = SOURCE.read_bytes()
    out_dir = _build_root() / "microadam_cpu"
    errors = []
    for flags in _flag_sets():
        ident = [
            source.hex(),
            cxx,
            *flags,
            torch.__version__,
            str(torch.version.git_version),
            sys.version,
            _cpu_identity() if "-march=native" in flags else platform.machine(),
        ]
        digest = hashlib.sha256("\0".join(ident).encode()).hexdigest()[:16]
        target = out_dir / f"microadam_cpu_{digest}.so"
        if target.exists():
            build_target = _target_of(flags)
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        cmd = [cxx, str(SOURCE), "-o", str(tmp), *flags]
        if not errors:  # once, before the first attempt: the step would seem to hang
            print(
                f"microadam: compiling the fused CPU step (-march={_target_of(flags)}, about "
                f"10 s, once: cached in {out_dir})",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as err:
            errors.append(f"{cxx} could not run ({err})")
            break  # no compiler: other flags will not help
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: others see no file or the whole file
            build_seconds = time.perf_counter() - start
            build_target = _target_of(flags)
            if verbose:
                print(f"built {target} in {build_seconds:.1f} s")
            return target
        tmp.unlink(missing_ok=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        errors.append(f"{' '.join(cmd[:2])} ... failed:\n{tail}")
    raise RuntimeError("; ".join(errors))


def _load_library() -> Any:
    """Build if needed, load, and return the ``torch.ops.microadam_cpu`` namespace."""
    if not sys.platform.startswith(("linux", "darwin")):
        raise RuntimeError(f"platform {sys.platform} is not supported by the fused CPU step")
    torch.ops.load_library(str(build()))
    return torch.ops.microadam_cpu


def unavailable_reason() -> str | None:
    """``None`` when the kernel is loaded (building it on the first call), else why not."""
    global _ops, _failure, _failure_is_error
    if _ops is not None or _failure is not None:
        return _failure
    with _lock:
        if _ops is None and _failure is None:
            if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
                _failure = f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
                _failure_is_error = False
            else:
                try:
                    _ops = _load_library()
                except Exception as err:  # any failure means: use the pure path
                    _failure = f"{type(err).__name__}: {err}"
                    _failure_is_error = True
    return _failure


def take_fallback_warning() -> str | None:
    """The one fallback warning of the process, the first time it is asked for; else None."""
    global _warned
    with _lock:
        if _warned or not _failure_is_error:
            return None
        _warned = True
    return (
        f"microadam: the fused CPU step of MicroAdam is unavailable ({_failure}); "
        "MicroAdam uses its pure-PyTorch step for the rest of this process (same results, "
        f"slower). Set {DISABLE_ENV}=1 to skip the attempt, or pass fused=False."
    )


def _reset() -> None:
    """Forget the loaded kernel or the failure (tests only; a loaded library stays loaded)."""
    global _ops, _failure, _failure_is_error, _warned
    with _lock:
        if _failure is not None:
            _ops = None
        _failure, _failure_is_error, _warned = None, False, False


def unsupported_reason(param: torch.Tensor, grad: torch.Tensor, group: dict) -> str | None:
    """Why the kernel does not cover this parameter under ``group``'s settings, or None.

    This checks the configuration only; whether the kernel could be built is
    :func:`unavailable_reason`.
    """
    if param.device.type != "cpu":
        return f"parameters on {param.device.type}"
    if type(param.data) is not torch.Tensor:
        return f"parameters of type {type(param.data).__name__}"
    if param.dtype not in SUPPORTED_DTYPES:
        return f"{param.dtype} parameters (it covers float32, bfloat16 and float16)"
    if grad.dtype != param.dtype:
        return f"{grad.dtype} gradients of {param.dtype} parameters"
    if grad.layout != torch.strided or grad.device != param.device:
        return "gradients that are not dense tensors on the parameter's device"
    if group["value_dtype"] not in SUPPORTED_DTYPES:
        return f"value_dtype {group['value_dtype']} (it covers float32, bfloat16, float16)"
    unit = work_unit(
        group["topk_block_size"],
        group["quant_block_size"],
        group["quant_bits"],
        group["error_feedback"],
    )
    if unit > MAX_UNIT:
        return (
            f"topk_block_size {group['topk_block_size']} with quant_block_size "
            f"{group['quant_block_size']} (lcm above {MAX_UNIT} elements)"
        )
    return None


def micro_adam_multi_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    window_size: int,
    density: float,
    topk_block_size: int,
    quant_block_size: int,
    quant_bits: int,
    error_feedback: bool,
    rounding: str,
    maximize: bool,
    check_grads: Sequence[torch.Tensor] = (),
) -> int | None:
    """One MicroAdam step of several parameters of one param group, in one kernel call.

    Same contract as :func:`microadam.optim.micro_adam.micro_adam_step_` for each
    parameter (states already initialised and checked, ``grads`` only read). The caller
    checks :func:`unsupported_reason` and :func:`unavailable_reason` first. The kernel
    computes the step's numbers (t, the ages' decay factors, the bias corrections, the
    noise key) from each state's ``step`` and ``rng_seed`` and increments ``step``.

    ``check_grads`` (supported dtypes, on the CPU) are checked for NaN and inf in the same
    parallel region, before anything else: if any is not all finite, nothing is updated
    and its position in ``check_grads`` is returned; otherwise None.
    """
    if not params and not check_grads:
        return None
    if _ops is None:
        raise RuntimeError(f"the fused CPU step is not loaded ({unavailable_reason()})")
    targets = [p if p.is_contiguous() else p.contiguous() for p in params]
    # Every state tensor the layout has for these settings, by key (the kernel checks each
    # one's dtype and size against the same table: tests/kernels/test_fused_cpu.py).
    settings = {"error_feedback": error_feedback, "rounding": rounding}
    state = {
        e.key: [st[e.key] for st in states] if e.present(settings) else [] for e in STATE_LAYOUT
    }
    bad = _ops.micro_adam_step_(
        [p.detach() for p in targets],
        [g if g.is_contiguous() else g.contiguous() for g in grads],
        state["step"],
        state["rng_seed"],
        state["window_indices"],
        state["window_values"],
        state["ef_codes"],
        state["ef_min"],
        state["ef_max"],
        float(lr),
        *(float(b) for b in betas),
        float(eps),
        float(weight_decay),
        kept_per_block(topk_block_size, density),
        window_size,
        topk_block_size,
        quant_block_size,
        work_unit(topk_block_size, quant_block_size, quant_bits, error_feedback),
        quant_bits,
        error_feedback,
        rounding == "stochastic",
        maximize,
        [g if g.is_contiguous() else g.contiguous() for g in check_grads],
    )
    if bad >= 0:
        return bad
    for p, target in zip(params, targets, strict=True):
        if target is not p:
            p.copy_(target)
    return None


def micro_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    value_dtype: torch.dtype,
    **hyper: Any,
) -> None:
    """The fused counterpart of :func:`microadam.optim.micro_adam.micro_adam_step_`: the
    same keyword arguments (checked by :func:`micro_adam_multi_step_`'s signature), and
    ``value_dtype``, which decides whether the kernel covers the call."""
    reason = unsupported_reason(param, grad, {**hyper, "value_dtype": value_dtype})
    reason = reason or unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the fused CPU step does not cover this call: {reason}")
    micro_adam_multi_step_([param], [grad], [state], **hyper)
