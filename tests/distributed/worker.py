"""One rank of the distributed tests (run by launch.py with torch's env:// variables).

``python worker.py MODE OUT_DIR [CHECKPOINT_DIR]``; each mode writes what it measured to
``OUT_DIR`` (JSON and .pt files) for the test to assert on. Gloo on CPU, one thread a rank.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from microadam import MicroAdam
from microadam.memory import state_bytes
from microadam.optim.adapprox import Adapprox


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    # 32*64 + 64 + 64*10 + 10 = 2762 parameters.
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))


def _teacher_data(steps: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 32, generator=g)
    w = torch.randn(32, 10, generator=g)
    return x, (x @ w).argmax(-1)


def _write(out: Path, name: str, obj) -> None:
    (out / name).write_text(json.dumps(obj, indent=1))


# -- DDP -------------------------------------------------------------------------------


def run_ddp(out: Path) -> None:
    """DDP on two ranks (half the batch each) against one process on the whole batch, for a
    global batch of 32 (the halves' means average exactly) and of 24 (they do not)."""
    results = {str(batch): _ddp_case(batch) for batch in (32, 24)}
    if dist.get_rank() == 0:
        _write(out, "ddp.json", results)


def _ddp_case(batch: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    steps = 150
    hyper = dict(lr=1e-2, density=0.05, topk_block_size=256, quant_block_size=64)
    model = _mlp(0)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    opt = MicroAdam(ddp.parameters(), **hyper)
    ref_opt = MicroAdam(ref.parameters(), **hyper)
    x, y = _teacher_data(steps, batch)
    half = batch // world
    diffs, flip = [], None
    for t in range(steps):
        xs, ys = x[t, rank * half : (rank + 1) * half], y[t, rank * half : (rank + 1) * half]
        F.cross_entropy(ddp(xs), ys).backward()  # a mean: DDP averages to the global mean
        opt.step()
        opt.zero_grad()
        F.cross_entropy(ref(x[t]), y[t]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        pairs = list(zip(model.parameters(), ref.parameters(), strict=True))
        diffs.append(max((a - b).abs().max().item() for a, b in pairs))
        row = t % 10  # the window row written at this step
        if flip is None and not all(
            torch.equal(
                opt.state[a]["window_indices"][row], ref_opt.state[b]["window_indices"][row]
            )
            for a, b in pairs
        ):
            flip = t + 1
    # DDP keeps the replicas identical: check that across ranks too.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {
        "max_abs_diff": diffs,
        "first_topk_flip": flip,
        "replicas_identical": all(torch.equal(gathered[0], g) for g in gathered),
        "final_loss_ddp": F.cross_entropy(model(x[-1]), y[-1]).item(),
        "final_loss_ref": F.cross_entropy(ref(x[-1]), y[-1]).item(),
    }


# -- FSDP2 -----------------------------------------------------------------------------


def _tiny_gpt(seed: int) -> nn.Module:
    from microadam.bench.models import TinyGPT

    torch.manual_seed(seed)
    return TinyGPT(context=16, d_model=32, n_layer=2, n_head=2)


def _byte_batches(steps: int, batch: int, context: int, seed: int = 2):
    from microadam.bench.data import stdlib_text

    data = torch.frombuffer(bytearray(stdlib_text(max_bytes=100_000)), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - context - 1, (steps, batch), generator=g)
    idx = starts[..., None] + torch.arange(context + 1)
    seq = data[idx]
    return seq[..., :-1], seq[..., 1:]


def _shard(model: nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)


GPT_HYPER = dict(lr=3e-3, density=0.05, topk_block_size=512, quant_block_size=64)


def run_fsdp(out: Path) -> None:
    """FSDP2 on two ranks against one process on the whole batch, same data and init."""
    from microadam.kernels import micro_adam_cpu

    rank, world = dist.get_rank(), dist.get_world_size()
    steps, batch = int(os.environ.get("MICROADAM_FSDP_STEPS", "200")), 16
    xb, yb = _byte_batches(steps + 1, batch, 16)
    half = batch // world
    model = _tiny_gpt(0)
    _shard(model)
    opt = MicroAdam(model.parameters(), **GPT_HYPER)
    losses = []
    for t in range(steps):
        sl = slice(rank * half, (rank + 1) * half)
        _, loss = model(xb[t, sl], yb[t, sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        both = loss.detach().clone()
        dist.all_reduce(both)
        losses.append(both.item() / world)
    # The fused kernel covers the local shard (not the DTensor itself).
    p = next(model.parameters())
    group = opt.param_groups[0]
    reasons = {
        "dtensor": micro_adam_cpu.unsupported_reason(p, p, group),
        "local_shard": micro_adam_cpu.unsupported_reason(p.to_local(), p.to_local(), group),
    }
    local_numel = sum(q.to_local().numel() for q in model.parameters())
    with torch.no_grad():
        _, eval_loss = model(xb[steps], yb[steps])
    result = {
        "losses": losses,
        "eval_loss": eval_loss.item(),
        "state_bytes": state_bytes(opt),
        "local_numel": local_numel,
        "fused_reasons": reasons,
    }

    # Adapprox on the same shards: per-shard factors of the local rows.
    model2 = _tiny_gpt(0)
    _shard(model2)
    opt2 = Adapprox(model2.parameters(), lr=3e-3, max_rank=4)
    ad_losses = []
    for t in range(30):
        sl = slice(rank * half, (rank + 1) * half)
        _, loss = model2(xb[t, sl], yb[t, sl])
        loss.backward()
        opt2.step()
        opt2.zero_grad()
        ad_losses.append(loss.item())
    w = model2.blocks[0].fc.weight
    result["adapprox"] = {
        "first_loss": ad_losses[0],
        "last_loss": sum(ad_losses[-5:]) / 5,
        "factor_q_rows": opt2.state[w]["factor_q"].shape[0],
        "local_rows": w.to_local().shape[0],
        "global_rows": w.shape[0],
    }
    _write(out, f"fsdp_rank{rank}.json", result)

    if rank == 0:  # the single-process reference on the whole batch
        ref = _tiny_gpt(0)
        ref_opt = MicroAdam(ref.parameters(), **GPT_HYPER)
        ref_losses = []
        for t in range(steps):
            _, loss = ref(xb[t], yb[t])
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            ref_losses.append(loss.item())
        with torch.no_grad():
            _, ref_eval = ref(xb[steps], yb[steps])
        _write(
            out,
            "fsdp_ref.json",
            {
                "losses": ref_losses,
                "eval_loss": ref_eval.item(),
                "state_bytes": state_bytes(ref_opt),
                "numel": sum(q.numel() for q in ref.parameters()),
            },
        )


# -- DCP -------------------------------------------------------------------------------


def _dcp_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 37 rows: uneven shards (19 and 18 rows), so the per-shard states differ in shape.
    return nn.Sequential(nn.Linear(24, 37), nn.Tanh(), nn.Linear(37, 10))


def _dcp_setup(sharded: bool = True, optimizer: str = "MicroAdam"):
    model = _dcp_model()
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    params = list(model.parameters())
    if optimizer == "Adapprox":
        # A tight tolerance, so the adaptive ranks vary; no first moment in group 1.
        opt = Adapprox(
            [{"params": params[:2]}, {"params": params[2:], "betas": (None, 0.999)}],
            lr=1e-2,
            max_rank=8,
            rank_step=1,
            rank_tolerance=0.3,
        )
        return model, opt
    opt = MicroAdam(
        [
            {"params": params[:2]},
            {"params": params[2:], "rounding": "stochastic"},  # exercises rng_seed
        ],
        lr=1e-2,
        density=0.1,
        topk_block_size=64,
        quant_block_size=32,
    )
    return model, opt


def _dcp_train(model, opt, t0: int, t1: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(t1, 16, 24, generator=g)
    y = torch.randint(0, 10, (t1, 16), generator=g)
    half = 16 // world
    for t in range(t0, t1):
        sl = slice(rank * half, (rank + 1) * half)
        F.cross_entropy(model(x[t, sl]), y[t, sl]).backward()
        opt.step()
        opt.zero_grad()


def _local_states(model, opt) -> dict:
    return {
        name: {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        for name, p in model.named_parameters()
    }


def _state_mismatch(before: dict, after: dict) -> list[str]:
    """The ``param.key`` of every state tensor that differs (dtype, shape or bits), is
    missing from ``after`` or only in it."""
    return [
        f"{name}.{k}"
        for name, st in before.items()
        for k, v in st.items()
        if k not in after[name]
        or after[name][k].dtype != v.dtype
        or after[name][k].shape != v.shape
        or not torch.equal(after[name][k], v)
    ] + [f"{name}.{k} (extra)" for name, st in after.items() for k in st if k not in before[name]]


def _full_params(model) -> dict:
    return {name: p.full_tensor().clone() for name, p in model.named_parameters()}


def _saved_layout(osd: dict) -> dict:
    """What DCP was given for each parameter's state: ``[kind, global shape, dtype]`` per
    key, ``kind`` being ``"DTensor[placements]"`` or ``"plain"``."""
    from microadam.optim._sharding import is_dtensor

    def describe(v):
        kind = f"DTensor{list(map(str, v.placements))}" if is_dtensor(v) else "plain"
        return [kind, list(v.shape), str(v.dtype)]

    return {
        name: {k: describe(v) for k, v in st.items() if isinstance(v, torch.Tensor)}
        for name, st in osd["state"].items()
    }


def run_dcp_save(out: Path, ckpt: str, optimizer: str = "MicroAdam") -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    model, opt = _dcp_setup(optimizer=optimizer)
    _dcp_train(model, opt, 0, 7)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    torch.save(_local_states(model, opt), out / f"state_before_rank{rank}.pt")
    _write(out, f"dcp_saved_layout_rank{rank}.json", _saved_layout(osd))
    _dcp_train(model, opt, 7, 14)
    full = _full_params(model)
    if rank == 0:
        torch.save(full, out / "final_uninterrupted.pt")


def run_dcp_load(out: Path, ckpt: str, optimizer: str = "MicroAdam") -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = dist.get_rank()
    model, opt = _dcp_setup(optimizer=optimizer)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    before = torch.load(out / f"state_before_rank{rank}.pt", weights_only=True)
    after = _local_states(model, opt)
    shapes = {name: {k: list(v.shape) for k, v in st.items()} for name, st in after.items()}
    _dcp_train(model, opt, 7, 14)
    full = _full_params(model)
    result = {"state_mismatch": _state_mismatch(before, after), "state_shapes": shapes}
    if rank == 0:
        ref = torch.load(out / "final_uninterrupted.pt", weights_only=True)
        result["max_param_diff"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
        result["params_bitwise_equal"] = all(torch.equal(full[k], ref[k]) for k in ref)
    _write(out, f"dcp_load_rank{rank}.json", result)


def run_dcp_adapprox_empty_shard(out: Path, ckpt: str) -> None:
    """Adapprox with a weight of one row on two ranks: rank 1's shard is empty, so it keeps
    the dense rule's ``exp_avg_sq`` where rank 0 keeps factors. Save with DCP after 3
    steps, load into a fresh model and optimizer, and compare the state and 3 more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    x = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(4))

    def setup():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 1))
        fully_shard(model)
        return model, Adapprox(model.parameters(), lr=1e-2, max_rank=4)

    def train(model, opt, t0, t1):
        for t in range(t0, t1):
            model(x[t]).square().mean().backward()
            opt.step()
            opt.zero_grad()

    model, opt = setup()
    train(model, opt, 0, 3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    before = _local_states(model, opt)
    model2, opt2 = setup()
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=ckpt)
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    after = _local_states(model2, opt2)
    train(model, opt, 3, 6)
    train(model2, opt2, 3, 6)
    full, full2 = _full_params(model), _full_params(model2)
    result = {
        "weight_state": sorted(before["2.weight"]),
        "state_mismatch": _state_mismatch(before, after),
        "params_bitwise_equal": all(torch.equal(full[k], full2[k]) for k in full),
    }
    _write(out, f"dcp_adapprox_empty_shard_rank{rank}.json", result)


def _dcp_load_errors(ckpt: str, optimizer: str) -> dict[str, str | None]:
    """Try to load the two-rank checkpoint in this one process, into FSDP2 on a world of
    one and into a plain model: the error each attempt raised, or None if it loaded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    errors: dict[str, str | None] = {}
    for name, sharded in (("fsdp_world1", True), ("plain", False)):
        model, opt = _dcp_setup(sharded=sharded, optimizer=optimizer)
        msd, osd = get_state_dict(model, opt)
        try:
            dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            errors[name] = f"{type(err).__name__}: {err}"
        else:
            errors[name] = None
    return errors


def run_dcp_wrong_world(out: Path, ckpt: str, optimizer: str = "MicroAdam") -> None:
    """Load the two-rank checkpoint in one process: FSDP2 on a world of one, and a plain
    model. Both must fail, and say why; and ``load_state_dict`` given such state directly
    (stacked state for an unsharded parameter, or stacked over another number of shards)
    must raise a ``ValueError`` naming the parameter."""
    from torch.distributed.tensor import DTensor

    errors = _dcp_load_errors(ckpt, optimizer)
    sharded_model, sharded_opt = _dcp_setup(sharded=True, optimizer=optimizer)
    _dcp_train(sharded_model, sharded_opt, 0, 1)
    sd = sharded_opt.state_dict()
    errors["keys"] = sorted(sd["state"][0])
    _, plain_opt = _dcp_setup(sharded=False, optimizer=optimizer)
    try:
        plain_opt.load_state_dict(sd)
    except ValueError as err:
        errors["load_state_dict_unsharded"] = str(err)
    key = "window_indices" if optimizer == "MicroAdam" else "factor_q"
    value = sd["state"][0][key]  # saved from 1 shard; pretend from 2
    sd["state"][0][key] = DTensor.from_local(
        value.to_local(),
        value.device_mesh,
        value.placements,
        run_check=False,
        shape=torch.Size((2, *value.shape[1:])),
        stride=value.stride(),
    )
    try:
        sharded_opt.load_state_dict(sd)
    except ValueError as err:
        errors["load_state_dict_two_shards"] = str(err)
    name = "dcp_wrong_world" if optimizer == "MicroAdam" else "dcp_adapprox_wrong_world"
    _write(out, f"{name}.json", errors)


# -- non-finite gradients --------------------------------------------------------------


def _snapshot(params, opt) -> list[torch.Tensor]:
    """Clones of every local parameter shard and every state tensor, in a fixed order."""
    from microadam.optim._sharding import local

    out = [local(p).detach().clone() for p in params]
    for p in params:
        for _, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor):
                out.append(local(v).clone())
    return out


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1), y.view(-1))
        for x, y in zip(a, b, strict=True)
    )


def _bad_step(params, opt, forward_backward) -> dict:
    """One step on a non-finite gradient (``forward_backward`` makes it), then a good one."""
    before = _snapshot(params, opt)
    forward_backward(bad=True)
    try:
        opt.step()
    except RuntimeError as err:
        error = str(err)
    else:
        error = None
    unchanged = _same_bits(before, _snapshot(params, opt))
    opt.zero_grad()
    forward_backward(bad=False)
    opt.step()
    opt.zero_grad()
    after = _snapshot(params, opt)
    return {
        "error": error,
        "unchanged": unchanged,
        "good_step_changed_params": not _same_bits(before[: len(params)], after[: len(params)]),
        "finite_after": all(bool(torch.isfinite(t.float()).all()) for t in after),
    }


def run_nonfinite(out: Path) -> None:
    """A NaN in one rank's local gradient shard (FSDP2) and an inf in one rank's input
    batch (DDP), for MicroAdam and Adapprox: both ranks raise, nothing changes, and the
    next good step works."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 24, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    half = 16 // world
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    makers = {
        "MicroAdam": lambda ps: MicroAdam(
            ps, lr=1e-2, density=0.1, topk_block_size=64, quant_block_size=32
        ),
        "Adapprox": lambda ps: Adapprox(ps, lr=1e-2, max_rank=4),
    }
    result = {}
    for name, make in makers.items():
        # FSDP2: rank 1 alone gets a NaN in its local shard of the last weight (factored
        # for Adapprox); rank 0's own gradients are all finite.
        model = _dcp_model()
        fully_shard(model[0])
        fully_shard(model)
        params = list(model.parameters())
        opt = make(params)
        for _ in range(3):
            F.cross_entropy(model(xs), ys).backward()
            opt.step()
            opt.zero_grad()

        def fsdp_fb(bad: bool, model=model) -> None:
            F.cross_entropy(model(xs), ys).backward()
            if bad and rank == 1:
                model[2].weight.grad.to_local()[0, 0] = float("nan")

        result[f"fsdp_{name}"] = _bad_step(params, opt, fsdp_fb)

        # DDP: an inf in rank 1's input batch reaches the all-reduced gradient of both.
        model = _dcp_model()
        ddp = DDP(model)
        params = list(model.parameters())
        opt = make(params)
        for _ in range(3):
            F.cross_entropy(ddp(xs), ys).backward()
            opt.step()
            opt.zero_grad()

        def ddp_fb(bad: bool, ddp=ddp) -> None:
            inp = xs.clone()
            if bad and rank == 1:
                inp[0, 0] = float("inf")
            F.cross_entropy(ddp(inp), ys).backward()

        result[f"ddp_{name}"] = _bad_step(params, opt, ddp_fb)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result[f"ddp_{name}"]["replicas_identical"] = all(
            torch.equal(gathered[0], t) for t in gathered
        )
    _write(out, f"nonfinite_rank{rank}.json", result)


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if mode == "ddp":
            run_ddp(out)
        elif mode == "fsdp":
            run_fsdp(out)
        elif mode == "dcp_save":
            run_dcp_save(out, sys.argv[3])
        elif mode == "dcp_load":
            run_dcp_load(out, sys.argv[3])
        elif mode == "nonfinite":
            run_nonfinite(out)
        elif mode == "dcp_adapprox_save":
            run_dcp_save(out, sys.argv[3], "Adapprox")
        elif mode == "dcp_adapprox_load":
            run_dcp_load(out, sys.argv[3], "Adapprox")
        elif mode == "dcp_adapprox_empty_shard":
            run_dcp_adapprox_empty_shard(out, sys.argv[3])
        elif mode == "dcp_adapprox_wrong_world":
            run_dcp_wrong_world(out, sys.argv[3], "Adapprox")
        elif mode == "dcp_wrong_world":
            run_dcp_wrong_world(out, sys.argv[3])
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        dist.barrier()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait on the other rank's collectives
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
