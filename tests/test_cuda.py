"""CUDA-only properties. Skipped, with the reason, where no CUDA device is present."""

from __future__ import annotations

import warnings

import pytest
import torch

import harness
import safeopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("impl", [{"foreach": False}, {"foreach": True}, {"fused": True}], ids=["forloop", "foreach", "fused"])
def test_the_decision_costs_one_host_synchronisation_per_step(impl: dict) -> None:
    params = harness.make_params([(64, 32), (32,), (16, 16), (8,)], device="cuda")
    opt = safeopt.Adam(params, lr=0.1, **impl)
    gen = torch.Generator().manual_seed(0)
    for p, kind in zip(params, ["dense", "zero", "partial", "negzero"]):
        p.grad = harness.make_grad(p, kind, gen)
    opt.step()  # state allocation happens once, outside the count
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
