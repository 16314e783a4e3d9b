"""MicroAdam under torch.distributed: DDP, FSDP2 (fully_shard) and DCP checkpoints.

Run on the CPU with two processes (gloo):

    torchrun --nproc-per-node 2 examples/distributed.py --mode ddp
    torchrun --nproc-per-node 2 examples/distributed.py --mode fsdp
    torchrun --nproc-per-node 2 examples/distributed.py --mode dcp

Every mode prints what it checked. Without torchrun the script runs as a world of one.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from microadam import MicroAdam
from microadam.memory import state_bytes

HYPER = dict(lr=1e-2, density=0.05, topk_block_size=256, quant_block_size=64)


def say(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def mlp() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))


def batches(steps: int, batch: int):
    g = torch.Generator().manual_seed(1)  # the same data on every rank
    x = torch.randn(steps, batch, 32, generator=g)
    return x, (x @ torch.randn(32, 10, generator=g)).argmax(-1)


def my_half(t: torch.Tensor) -> torch.Tensor:
    n = t.shape[0] // dist.get_world_size()
    return t[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def ddp(steps: int = 100) -> None:
    """DDP: each rank gets half the batch; compare with one process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp()
    ref = copy.deepcopy(model)  # the one-process run, computed on every rank
    wrapped = DDP(model)
    opt, ref_opt = MicroAdam(wrapped.parameters(), **HYPER), MicroAdam(ref.parameters(), **HYPER)
    x, y = batches(steps, 32)
    identical = 0
    for t in range(steps):
        F.cross_entropy(wrapped(my_half(x[t])), my_half(y[t])).backward()  # a mean
        opt.step()
        opt.zero_grad()
        F.cross_entropy(ref(x[t]), y[t]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        pairs = zip(model.parameters(), ref.parameters(), strict=True)
        same = all(torch.equal(a, b) for a, b in pairs)
        if same and identical == t:  # count the steps before the first difference
            identical += 1
    loss = F.cross_entropy(model(x[-1]), y[-1]).item()
    say(f"ddp: {identical}/{steps} steps bit-identical to one process on the global batch")
    say(f"ddp: final loss {loss:.4f}")


def gpt() -> nn.Module:
    from microadam.bench.models import TinyGPT

    torch.manual_seed(0)
    return TinyGPT(context=16, d_model=32, n_layer=2, n_head=2)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def fsdp(steps: int = 100) -> None:
    """FSDP2: parameters become DTensors sharded on dim 0; MicroAdam steps each rank's local
    shard and keeps that shard's state (about 1 / world_size of the single-process bytes)."""
    from microadam.kernels import micro_adam_cpu

    model = shard(gpt())
    hyper = {**HYPER, "lr": 3e-3, "topk_block_size": 512}
    opt = MicroAdam(model.parameters(), **hyper)
    from microadam.bench.data import stdlib_text

    text = torch.frombuffer(bytearray(stdlib_text(max_bytes=100_000)), dtype=torch.uint8)
    g = torch.Generator().manual_seed(2)  # the same batches on every rank
    for t in range(steps):
        starts = torch.randint(0, text.numel() - 17, (16, 1), generator=g)
        idx = text[starts + torch.arange(17)].long()  # 16 windows of 17 bytes of Python source
        _, loss = model(my_half(idx[:, :-1]), my_half(idx[:, 1:]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if t in (0, steps - 1):
            total = loss.detach().clone()
            dist.all_reduce(total)
            say(f"fsdp: step {t + 1} loss {total.item() / dist.get_world_size():.4f}")
    p = next(model.parameters())
    local_ok = micro_adam_cpu.unsupported_reason(p.to_local(), p.to_local(), opt.defaults)
    ref = gpt()  # one step of an unsharded copy, only to size its state
    ref_opt = MicroAdam(ref.parameters(), **hyper)
    _, loss = ref(idx[:, :-1], idx[:, 1:])
    loss.backward()
    ref_opt.step()
    mine = torch.tensor([state_bytes(opt)])
    per_rank = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, mine)
    say(f"fsdp: parameters are {type(p).__name__}, placements {p.placements}")
    say(f"fsdp: the fused CPU kernel takes the local shard: {local_ok is None}")
    say(
        f"fsdp: state bytes per rank {[int(b) for b in per_rank]}, one process "
        f"{state_bytes(ref_opt)} (ratio {int(per_rank[0]) / state_bytes(ref_opt):.3f})"
    )


def dcp(steps: int = 6) -> None:
    """DCP: save model and optimizer mid-training, load into fresh objects, continue; the
    result equals the uninterrupted run bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    def build():
        model = mlp()
        fully_shard(model[0])
        fully_shard(model)
        return model, MicroAdam(model.parameters(), **HYPER)

    x, y = batches(2 * steps, 16)

    def train(model, opt, t0, t1):
        for t in range(t0, t1):
            F.cross_entropy(model(my_half(x[t])), my_half(y[t])).backward()
            opt.step()
            opt.zero_grad()

    path = [tempfile.mkdtemp(prefix="microadam_dcp_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)  # one checkpoint directory for all ranks
    model, opt = build()
    train(model, opt, 0, steps)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path[0])
    saved = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    train(model, opt, steps, 2 * steps)

    model2, opt2 = build()
    msd, osd = get_state_dict(model2, opt2)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=path[0])
    set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    state_ok = all(torch.equal(opt2.state[model2[0].weight][k], v) for k, v in saved.items())
    train(model2, opt2, steps, 2 * steps)
    same = all(
        torch.equal(a.full_tensor(), b.full_tensor())
        for a, b in zip(model.parameters(), model2.parameters(), strict=True)
    )
    ok = torch.tensor([int(state_ok)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    say(f"dcp: checkpoint in {path[0]}")
    say(f"dcp: every rank's MicroAdam state restored exactly: {bool(ok.item())}")
    say(f"dcp: resumed run bit-identical to the uninterrupted one: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("ddp", "fsdp", "dcp"), required=True)
    args = parser.parse_args()
    if "RANK" not in os.environ:  # plain `python`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    {"ddp": ddp, "fsdp": fsdp, "dcp": dcp}[args.mode]()
    dist.barrier()  # gloo aborts a process that tears down while its peer still talks
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
