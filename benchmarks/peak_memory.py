"""Extra peak memory of one optimizer step on a single large parameter.

For each optimizer and each of two malloc settings (see ``ENVS``), in a fresh subprocess:
build one float32 parameter of ``--numel`` elements and its gradient,
take a first step (which creates the state) and fault in every state page; then for two
more steps reset the kernel's peak-RSS counter (``/proc/self/clear_refs``, Linux only),
step, and read the peak (``VmHWM``). A step's scratch memory is that peak minus the
resident memory just before the step: what the step needs beyond the parameter, the
gradient and the optimizer state itself. A fourth step runs under ``torch.profiler`` with
``profile_memory=True``; the running sum of its allocation and free events gives the peak
of live tensor bytes, a figure that does not depend on what malloc retains.

    .venv/bin/python benchmarks/peak_memory.py                 # 100M elements
    .venv/bin/python benchmarks/peak_memory.py --numel 10000000 --optimizers microadam
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
from microadam import create_optimizer, state_bytes

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)

name, numel, kwargs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
torch.manual_seed(0)
p = torch.nn.Parameter(torch.randn(numel))
p.grad = torch.randn(numel)
opt = create_optimizer(name, [p], **kwargs)
def touch_state():
    # Fault in every page of the state (zeros from calloc are not resident until written),
    # so that later peaks measure scratch memory, not the first touch of state buffers.
    for per_param in opt.state.values():
        for t in per_param.values():
            if torch.is_tensor(t) and t.numel():
                t.view(-1)[:: max(1, 4096 // t.element_size())].add_(0)

steps = []
for i in range(3):
    if i:
        touch_state()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    held = state_bytes(opt)
    opt.step()
    steps.append({"rss_before": before, "peak": status("VmHWM"),
                  "new_state": state_bytes(opt) - held})
# Independent of malloc: the peak of live tensor bytes allocated by torch during one more
# step, from the profiler's allocation and free events in time order.
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    opt.step()
events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                key=lambda e: e.start_ns())
live = live_peak = 0
for e in events:
    live += e.nbytes()
    live_peak = max(live_peak, live)
print(json.dumps({"optimizer": name, "kwargs": kwargs, "numel": numel, "live_peak": live_peak,
                  "state_bytes": state_bytes(opt), "steps": steps}))
"""


# Two allocator settings. "default" is glibc as a user runs it: each OpenMP worker thread
# gets its own malloc arena, which keeps some freed memory for reuse, so the first steps
# raise the peak once. "tight" sends blocks of 64 KiB and more straight to mmap (returned on
# free) and uses a single arena, so resident memory follows live memory.
ENVS = {
    "default": dict(os.environ),
    "tight": {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "65536",
        "MALLOC_ARENA_MAX": "1",
    },
}


def measure(name: str, numel: int, kwargs: dict, env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(numel), json.dumps(kwargs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "env": env}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=100_000_000)
    parser.add_argument("--optimizers", default="microadam,adamw")
    parser.add_argument("--out", help="write the raw numbers to this JSON file")
    args = parser.parse_args()
    runs = []
    for name in args.optimizers.split(","):
        variants = {
            "microadam": [{"fused": True}, {"fused": False}],
            "adamw": [{"foreach": False}, {"foreach": True}, {"fused": True}],
        }.get(name, [{}])
        for kwargs in variants:
            for env in ENVS:
                runs.append(measure(name, args.numel, kwargs, env))
    param_mb = args.numel * 4 / 2**20
    print(f"one float32 parameter of {args.numel:,} elements ({param_mb:.0f} MiB)\n")
    print(
        "| optimizer | malloc | state MiB | RSS scratch, step 2 (MiB) | step 3 (MiB) "
        "| worst / param size | live tensor scratch, step 4 (MiB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        # Scratch = peak RSS during the step - RSS before it (state already resident).
        extras = [(s["peak"] - s["rss_before"] - s["new_state"]) / 2**20 for s in r["steps"][1:]]
        label = r["optimizer"] + (f" {r['kwargs']}" if r["kwargs"] else "")
        print(
            f"| {label} | {r['env']} | {r['state_bytes'] / 2**20:.1f} | {extras[0]:.1f} "
            f"| {extras[1]:.1f} "
            f"| {max(extras) / param_mb:.1%} | {r['live_peak'] / 2**20:.1f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(runs, f, indent=2)


if __name__ == "__main__":
    main()
