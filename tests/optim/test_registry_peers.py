"""The optional peers through the registry: building one says nothing (no warning, no log
line, no print, also on its first import) and ``galore_adamw`` takes the usual closure."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from microadam import create_optimizer, list_optimizers
from microadam.optim.registry import all_specs

PEERS = [spec.name for spec in all_specs() if spec.requires is not None and spec.available()]
needs_galore = pytest.mark.skipif(
    "galore_adamw" not in list_optimizers(), reason="galore_torch is not installed"
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("name", PEERS)
def test_building_a_peer_warns_nothing(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_optimizer(name, _model())
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


_FIRST_IMPORT = """
import json, sys, warnings
import torch
from microadam import create_optimizer
names = json.loads(sys.argv[1])
print("--start--", file=sys.stderr, flush=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for name in names:
        create_optimizer(name, torch.nn.Linear(4, 4))
print(json.dumps([f"{w.category.__name__}: {w.message}" for w in caught]))
"""


@pytest.mark.skipif(not PEERS, reason="no optional peer is installed")
def test_the_first_import_of_the_peers_is_quiet():
    # In a fresh process, so that the peers are imported here for the first time (with
    # their logging left as it is: bitsandbytes and torchao log at import).
    result = subprocess.run(
        [sys.executable, "-c", _FIRST_IMPORT, json.dumps(PEERS)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    assert result.stdout.strip().splitlines()[:-1] == []
    assert result.stderr.split("--start--", 1)[1].strip() == ""


@needs_galore
def test_galore_adamw_takes_the_usual_closure_and_the_loss_goes_down():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=gen), torch.randn(64, 1, generator=gen)
    opt = create_optimizer("galore_adamw", model, lr=1e-2, rank=4, update_proj_gap=5)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append(1))

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < 0.9 * losses[0]
    assert len(calls) == 30  # torch's step hooks run once per step
    from galore_torch import GaLoreAdamW

    assert isinstance(opt, GaLoreAdamW) and type(opt).__name__ == "GaLoreAdamW"
    # torch.save of the whole optimizer, and deepcopy, find the registry's class again
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    assert type(torch.load(buffer, weights_only=False)) is type(opt)
    assert type(copy.deepcopy(opt)) is type(opt)


@needs_galore
def test_galore_adamw_steps_without_a_closure_as_before():
    model = _model()
    opt = create_optimizer("galore_adamw", model, lr=1e-2, rank=4)
    nn.functional.mse_loss(model(torch.randn(8, 16)), torch.randn(8, 1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.warns(FutureWarning, match="deprecated"):  # the default can be overridden
        create_optimizer("galore_adamw", model, no_deprecation_warning=False)
