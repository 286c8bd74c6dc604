"""One rank of the multi-process tests in tests/test_distributed.py (gloo on CPU).

Usage: python dist_worker.py SCENARIO OUT_DIR [CHECKPOINT_DIR]
with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment (the test sets them).
Each scenario writes OUT_DIR/<scenario>-rank<RANK>.pt; the test compares what the ranks wrote.

Scenarios:
  fsdp         FSDP2 (fully_shard), safeopt.Adam, torch.optim.Adam and safeopt.Adam(lazy=False)
               with the zero-gradient layer frozen, from the same start. An embedding whose
               rows in use all live on rank 0's shard, a dense layer and a layer whose whole
               gradient is zero (scaled by 0 in the loss).
  ddp_alternating OPTIMIZER
               DDP with find_unused_parameters=True and zero_grad(set_to_none=False), the two
               branches used in turn by both ranks, each rank with its own data; OPTIMIZER is
               "safeopt" or "torch" (safeopt.Adam or torch.optim.Adam).
  ddp_split    DDP with find_unused_parameters=True: in some steps rank 0 uses one branch and
               rank 1 the other, in others both ranks use the same one.
  dcp_first    FSDP2 + safeopt.AdamW: six steps uninterrupted (saved), then a fresh run of
               three steps saved with torch.distributed.checkpoint through get_state_dict.
  dcp_resume   New processes: a fresh model and optimizer, dcp.load + set_state_dict, steps 3-5.
  dcp_optimizers_first CHECKPOINT_DIR, dcp_optimizers_resume CHECKPOINT_DIR
               The same two for each optimizer of DCP_OPTIMIZERS (SGD with momentum, nesterov
               SGD, wrap() of SGD, RMSprop, Adagrad), one checkpoint each, with the
               frozen bias unfrozen (and the lr halved) after the save: its first update, from
               fresh state, comes after the resume.
  flags        The zero check on DTensor grads of every placement, straight from safeopt._rule:
               nonzero in one rank's shard only, zero everywhere, pending sums that cancel.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import safeopt


def local(t: Tensor) -> Tensor:
    """A rank's own part of a parameter or state tensor (its shard for a DTensor), copied."""
    to_local = getattr(t, "to_local", None)
    return (to_local() if to_local is not None else t).detach().clone()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Local shards of every parameter and its optimizer state, by parameter name."""
    state = {}
    for name, p in model.named_parameters():
        state[name] = {k: local(v) if isinstance(v, Tensor) else v for k, v in opt.state.get(p, {}).items()}
    return {
        "params": {name: local(p) for name, p in model.named_parameters()},
        "state": state,
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
    }


# --- FSDP2 ---------------------------------------------------------------------------------------


class Sharded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(8, 4)  # 8 rows: rank 0 holds rows 0-3, rank 1 rows 4-7
        self.dense = nn.Linear(4, 4)
        self.ghost = nn.Linear(4, 4)  # in the graph, but its gradient is all zero
        self.head = nn.Linear(4, 1)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        return self.head(torch.tanh(self.dense(h))) + 0.0 * self.ghost(h).sum(-1, keepdim=True)


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        fully_shard(child)
    return fully_shard(model)


def fsdp(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs: list[tuple[str, type, dict[str, Any]]] = [
        ("safeopt", safeopt.Adam, {}),
        ("torch", torch.optim.Adam, {}),
        ("lazy_false", safeopt.Adam, {"lazy": False}),  # freezing only: the same on every rank
    ]
    for name, cls, extra in runs:
        torch.manual_seed(0)
        model = shard(Sharded())
        opt = cls(model.parameters(), lr=0.05, weight_decay=0.1, **extra)
        if name == "lazy_false":
            opt.freeze(model.ghost)
        out[name] = [snapshot(model, opt)]
        for step in range(3):
            gen = torch.Generator().manual_seed(10 * step + rank)  # each rank its own batch
            idx = torch.randint(0, 4, (6,), generator=gen)  # rows 0-3 only: rank 0's shard
            opt.zero_grad(set_to_none=False)
            model(idx).pow(2).mean().backward()
            opt.step()
            out[name].append(snapshot(model, opt))
    return out


# --- DDP, branches split across ranks -------------------------------------------------------------


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 4)
        self.right = nn.Linear(4, 4)

    def forward(self, x: Tensor, branch: str) -> Tensor:
        return getattr(self, branch)(x)


def ddp_alternating(rank: int, optimizer: str) -> dict[str, Any]:
    """Per step, whether the idle branch stayed bit-identical; the final parameters and steps."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    ddp = DistributedDataParallel(TwoBranch(), find_unused_parameters=True)
    opt_cls = {"torch": torch.optim.Adam, "safeopt": safeopt.Adam}[optimizer]
    opt = opt_cls(ddp.parameters(), lr=0.05, weight_decay=0.1)
    stayed = []
    for step in range(6):
        branch, idle = ("left", "right") if step % 2 == 0 else ("right", "left")
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad(set_to_none=False)
        ddp(x, branch).pow(2).mean().backward()
        before = [p.detach().clone() for p in getattr(ddp.module, idle).parameters()]
        opt.step()
        stayed.append(all(torch.equal(p, b) for p, b in zip(getattr(ddp.module, idle).parameters(), before)))
    return {
        "stayed": stayed,
        "params": {k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
        "steps": [float(s["step"]) for s in opt.state.values()],
    }


# Per step, the branch each rank uses: "split" steps give each rank a different one.
DDP_PLAN = [("left", "left"), ("left", "right"), ("right", "right"), ("right", "left"), ("left", "left")]


def ddp_split(rank: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    ddp = DistributedDataParallel(TwoBranch(), find_unused_parameters=True)
    opt = safeopt.Adam(ddp.parameters(), lr=0.05, weight_decay=0.1)
    history = [snapshot(ddp.module, opt)]
    for step, branches in enumerate(DDP_PLAN):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad(set_to_none=False)
        ddp(x, branches[rank]).pow(2).mean().backward()
        opt.step()
        history.append(snapshot(ddp.module, opt))
    return {"history": history}


# --- torch.distributed.checkpoint with FSDP2 -------------------------------------------------------

DCP_STEPS = 6
DCP_SAVE_AT = 3


class EncoderHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor, detach: bool) -> Tensor:
        h = self.enc(x)
        return self.head(torch.tanh(self.mid(h.detach() if detach else h)))


# name: (torch class, its arguments, whether safeopt's twin runs it; else wrap() of it)
DCP_OPTIMIZERS: dict[str, tuple[type, dict[str, Any], bool]] = {
    "SGD": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}, True),
    # torch's fused SGD has no DTensor sharding rule (aten._fused_sgd_); tests/test_dcp.py has it
    "SGD-nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}, True),
    "wrap-SGD": (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}, False),
    "wrap-RMSprop": (torch.optim.RMSprop, {"momentum": 0.9, "centered": True}, False),
    "wrap-Adagrad": (torch.optim.Adagrad, {"initial_accumulator_value": 0.1}, False),
}


def dcp_build(name: str = "AdamW") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = shard(EncoderHead())
    groups = [
        {"params": model.enc.parameters(), "name": "enc"},
        {"params": [*model.mid.parameters(), *model.head.parameters()]},
    ]
    if name == "AdamW":
        return model, safeopt.AdamW(groups, lr=0.05, weight_decay=0.1)
    cls, kwargs, twin = DCP_OPTIMIZERS[name]
    twins = {torch.optim.SGD: safeopt.SGD}
    return model, twins[cls](groups, lr=0.05, **kwargs) if twin else safeopt.wrap(
        cls(groups, lr=0.05, **kwargs)
    )


def dcp_train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int, unfreeze_at: int | None = None
) -> None:
    for step in steps:
        if step == 0:
            opt.freeze(model.mid.bias)  # one parameter, frozen by itself
        if step == unfreeze_at:  # its first update: torch's first step with the lr of now
            opt.unfreeze(model.mid.bias)
            for group in opt.param_groups:
                group["lr"] = group["lr"] / 2
        if step == 4:
            opt.freeze("enc")  # a whole group
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(100 * step + rank))
        opt.zero_grad(set_to_none=False)
        model(x, detach=step % 2 == 1).pow(2).mean().backward()  # enc gets zero grads every other step
        opt.step()


def dcp_first(rank: int, checkpoint: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = dcp_build()
    dcp_train(model, opt, range(DCP_STEPS), rank)
    whole = snapshot(model, opt)

    model, opt = dcp_build()
    dcp_train(model, opt, range(DCP_SAVE_AT), rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    return {"whole": whole, "saved": snapshot(model, opt)}


def dcp_resume(rank: int, checkpoint: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = dcp_build()
    model_sd, optim_sd = get_state_dict(model, opt)  # steps once on zero grads to make state
    untouched = snapshot(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = snapshot(model, opt)
    dcp_train(model, opt, range(DCP_SAVE_AT, DCP_STEPS), rank)
    return {"untouched": untouched, "loaded": loaded, "resumed": snapshot(model, opt)}


def dcp_optimizers_first(rank: int, checkpoint: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = {}
    for name in DCP_OPTIMIZERS:
        model, opt = dcp_build(name)
        dcp_train(model, opt, range(DCP_STEPS), rank, unfreeze_at=DCP_SAVE_AT + 1)
        whole = snapshot(model, opt)
        model, opt = dcp_build(name)
        dcp_train(model, opt, range(DCP_SAVE_AT), rank, unfreeze_at=DCP_SAVE_AT + 1)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(checkpoint, name))
        out[name] = {"whole": whole, "saved": snapshot(model, opt)}
    return out


def dcp_optimizers_resume(rank: int, checkpoint: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    out = {}
    for name in DCP_OPTIMIZERS:
        model, opt = dcp_build(name)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint, name))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        loaded = snapshot(model, opt)
        dcp_train(model, opt, range(DCP_SAVE_AT, DCP_STEPS), rank, unfreeze_at=DCP_SAVE_AT + 1)
        out[name] = {"loaded": loaded, "resumed": snapshot(model, opt)}
    return out


# --- the zero check on DTensor grads -------------------------------------------------------------

# name -> (placement, this rank's local values as a function of the rank), and the expected flag
FLAG_CASES: dict[str, tuple[str, Any, bool]] = {
    "shard, nonzero on rank 0 only": ("shard", lambda r: [1.0, 2.0] if r == 0 else [0.0, 0.0], True),
    "shard, nonzero on rank 1 only": ("shard", lambda r: [0.0, -0.0] if r == 0 else [0.0, 3.0], True),
    "shard, zero everywhere": ("shard", lambda r: [0.0, -0.0], False),
    "shard, NaN on rank 1 only": ("shard", lambda r: [0.0, 0.0] if r == 0 else [float("nan"), 0.0], True),
    "shard, empty on rank 1": ("shard", lambda r: [0.0, 5.0] if r == 0 else [], True),
    "replicate, zero": ("replicate", lambda r: [-0.0, 0.0], False),
    "replicate, nonzero": ("replicate", lambda r: [0.0, 1.0], True),
    "partial sum that cancels": ("partial", lambda r: [1.0, -2.0] if r == 0 else [-1.0, 2.0], False),
    "partial sum, nonzero": ("partial", lambda r: [1.0, 0.0] if r == 0 else [0.0, 0.0], True),
}


def flags(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from safeopt import _rule

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    placement = {"shard": Shard(0), "replicate": Replicate(), "partial": Partial()}
    grads = []
    for kind, values, _ in FLAG_CASES.values():
        local_values = torch.tensor(values(rank), dtype=torch.float32)
        grads.append(DTensor.from_local(local_values, mesh, [placement[kind]], run_check=False))
    got = _rule.nonzero_flags(grads)
    # Interleaved with plain tensors: the order of the answers is kept.
    mixed = _rule.nonzero_flags([torch.zeros(2), grads[0], torch.ones(2), grads[2]])
    return {"flags": dict(zip(FLAG_CASES, got)), "mixed": mixed}


def main() -> None:
    scenario, out_dir = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    # A rank that dies leaves the other waiting in a collective: fail after a minute instead.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        if scenario == "fsdp":
            result = fsdp(rank)
        elif scenario == "ddp_alternating":
            result = ddp_alternating(rank, sys.argv[3])
        elif scenario == "ddp_split":
            result = ddp_split(rank)
        elif scenario == "dcp_first":
            result = dcp_first(rank, sys.argv[3])
        elif scenario == "flags":
            result = flags(rank)
        elif scenario == "dcp_resume":
            result = dcp_resume(rank, sys.argv[3])
        elif scenario == "dcp_optimizers_first":
            result = dcp_optimizers_first(rank, sys.argv[3])
        elif scenario == "dcp_optimizers_resume":
            result = dcp_optimizers_resume(rank, sys.argv[3])
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")
        torch.save(result, os.path.join(out_dir, f"{scenario}-rank{rank}.pt"))
        # No rank tears gloo down while another still talks to it (a rank whose peer hung up first
        # can abort in gloo's threads at exit: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
