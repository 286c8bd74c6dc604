"""Mixture-of-experts models as transformers 5 builds them: fused ``[E, ...]`` experts.

Mixtral, Qwen3-MoE, DeepSeek-V3 (shared experts beside the routed ones) and gpt-oss (``[E, 2I]``
expert biases), from tiny configs, random init, nothing downloaded. ``safeopt.AdamW`` over
``safeopt.groups(model, weight_decay=...)``, through a plain loop and the Hugging Face Trainer,
is checked in lockstep against torch: every expert slice and embedding row against a
``torch.optim.AdamW`` holding that slice alone, stepped with the same grad whenever the slice's
grad is nonzero; every other parameter against a ``torch.optim.AdamW`` holding it alone. So idle
slices and their state stay bit-identical, active ones get torch's update with their own step
count, and ``row_step`` counts them. A Trainer checkpoint resumes bit-identically, and
``safeopt.watch`` names the experts a torch AdamW run moved without tokens.

Optional extra (``pip install -e ".[transformers]"``): skipped with the reason when transformers is
missing, except in CI, which installs it (tests/test_clients.py's convention).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

import safeopt
from cases import trainer_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only: no downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 32
TOKENS = 4  # a batch: 4 tokens, top-2 of 8 experts, so most steps leave experts without tokens


def transformers() -> Any:
    if os.environ.get("CI"):
        return importlib.import_module("transformers")
    return pytest.importorskip(
        "transformers", reason='transformers is not installed (pip install -e ".[transformers]")'
    )


def _configs(tf: Any) -> dict[str, Callable[[], Any]]:
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    return {
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            **common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8
        ),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{**common, "num_key_value_heads": 2},
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=0,
            kv_lora_rank=8,
            q_lora_rank=None,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=4,
            n_group=1,
            topk_group=1,
        ),
        "gpt_oss": lambda: tf.GptOssConfig(**common, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    }


MODELS = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"]


def build(kind: str) -> nn.Module:
    tf = transformers()
    config = _configs(tf)[kind]()
    torch.manual_seed(0)
    model: nn.Module = tf.AutoModelForCausalLM.from_config(config)
    return model


def batches(n: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (1, TOKENS), generator=gen) for _ in range(n)]


def experts(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if ".experts." in n and p.dim() >= 2}


# --- the lockstep reference -------------------------------------------------------------------


class Lockstep:
    """Step hooks on the optimizer under test that step a torch reference beside it, with the
    grads it is given, and compare after every step with ``torch.equal``.

    Each row of a parameter of two or more dimensions in a ``lazy="rows"`` group is a parameter
    of its own (a torch AdamW over that slice alone, stepped when its grad slice is nonzero);
    every other parameter has a torch AdamW of its own, stepped when its grad is nonzero."""

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module) -> None:
        self.opt = opt
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.refs: dict[tuple[int, int | None], tuple[nn.Parameter, torch.optim.AdamW]] = {}
        self.pending: list[torch.optim.AdamW] = []
        self.steps = 0
        self.idle_slices = 0  # (slice, step) pairs with a zero grad slice while the parameter had a grad
        self.active_slices = 0
        self.handles = [opt.register_step_pre_hook(self.before), opt.register_step_post_hook(self.after)]

    def units(self, group: dict[str, Any], p: Tensor) -> list[int | None]:
        return list(range(p.shape[0])) if group.get("lazy") == "rows" and p.dim() >= 2 else [None]

    def ref(self, group: dict[str, Any], p: Tensor, i: int | None) -> tuple[nn.Parameter, torch.optim.AdamW]:
        key = (id(p), i)
        if key not in self.refs:
            value = p.detach() if i is None else p.detach()[i]
            ref = nn.Parameter(value.clone())
            kwargs = {
                k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "foreach", "fused", "amsgrad")
            }
            self.refs[key] = (ref, torch.optim.AdamW([ref], **kwargs))
        return self.refs[key]

    def before(self, opt: Any, args: Any, kwargs: Any) -> None:
        self.pending = []
        for group in self.opt.param_groups:
            for p in group["params"]:
                for i in self.units(group, p):
                    ref, ref_opt = self.ref(group, p, i)
                    grad = p.grad if p.grad is None or i is None else p.grad[i]
                    active = grad is not None and bool(grad.ne(0).any())
                    if i is not None and p.grad is not None:
                        self.active_slices += active
                        self.idle_slices += not active
                    if active:
                        assert grad is not None
                        ref.grad = grad.detach().clone()
                        ref_opt.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"])
                        self.pending.append(ref_opt)

    def after(self, opt: Any, args: Any, kwargs: Any) -> None:
        for ref_opt in self.pending:
            ref_opt.step()
            ref_opt.zero_grad()
        self.steps += 1
        self.check()

    def check(self) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state.get(p, {})
                for i in self.units(group, p):
                    ref, ref_opt = self.ref(group, p, i)
                    where = f"{self.names[id(p)]}[{i}] after step {self.steps}"
                    mine = p.detach() if i is None else p.detach()[i]
                    assert torch.equal(mine, ref), where
                    ref_state = ref_opt.state.get(ref, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            row = state[key] if i is None else state[key][i]
                            expected = ref_state.get(key, torch.zeros_like(row))
                            assert torch.equal(row, expected), f"{key} of {where}"
                    count = float(ref_state.get("step", 0))
                    if i is not None and "row_step" in state:
                        assert float(state["row_step"][i]) == count, f"row_step of {where}"
                    elif state and i is None:
                        assert float(state["step"]) == count, f"step of {where}"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def safeopt_adamw(model: nn.Module, impl: str = "forloop") -> safeopt.AdamW:
    flags = {"foreach": impl == "foreach", "fused": impl == "fused"}
    return safeopt.AdamW(safeopt.groups(model, weight_decay=0.1), lr=1e-2, **flags)


# --- a plain loop -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_plain_loop_lockstep_with_a_per_slice_torch_reference(kind: str) -> None:
    model = build(kind)
    impl = {"mixtral": "foreach", "qwen3_moe": "fused"}.get(kind, "forloop")
    opt = safeopt_adamw(model, impl)
    rows = {g["name"]: g["param_names"] for g in opt.param_groups}["rows"]
    assert set(experts(model)) <= {
        *rows,
        *({g["name"]: g["param_names"] for g in opt.param_groups}.get("rows_no_decay", [])),
    }
    lock = Lockstep(opt, model)
    for ids in batches(6):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # zero grads, not None: the case torch moves
    lock.remove()
    assert lock.steps == 6
    assert lock.idle_slices and lock.active_slices  # the run had experts without tokens
    counts = [opt.state[p]["row_step"] for p in experts(model).values() if "row_step" in opt.state[p]]
    assert counts and all(int(c.min()) < 6 for c in counts)  # some expert missed a step


def test_shared_experts_are_dense_and_routed_experts_rows() -> None:
    model = build("deepseek_v3")
    names = {g["name"]: g["param_names"] for g in safeopt.groups(model, weight_decay=0.1)}
    assert "model.layers.0.mlp.experts.gate_up_proj" in names["rows"]
    assert "model.layers.0.mlp.shared_experts.gate_proj.weight" in names["default"]
    assert "model.layers.0.mlp.gate.weight" in names["default"]  # the router: every expert's logit has a grad


def test_gpt_oss_expert_biases_are_rows_without_decay() -> None:
    model = build("gpt_oss")
    names = {g["name"]: g["param_names"] for g in safeopt.groups(model, weight_decay=0.1)}
    assert names["rows_no_decay"] == [
        "model.layers.0.mlp.experts.gate_up_proj_bias",
        "model.layers.0.mlp.experts.down_proj_bias",
    ]


@pytest.mark.parametrize("kind", MODELS)
def test_decay_split_is_the_trainers(kind: str) -> None:
    tf = transformers()
    model = build(kind)
    groups = safeopt.groups(model, weight_decay=0.1)
    decayed = {n for g in groups if g["weight_decay"] for n in g["param_names"]}
    assert decayed == set(tf.Trainer.get_decay_parameter_names(None, model))


# --- watch on a torch AdamW run ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_watch_names_the_drifting_experts_of_a_torch_adamw_run(kind: str) -> None:
    model = build(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idle: dict[str, set[int]] = {n: set() for n in experts(model)}
    slice_steps = dict.fromkeys(idle, 0)

    def note(*_: Any) -> None:  # registered first: sees the grads the watch sees
        for name, p in experts(model).items():
            zero = [i for i in range(p.shape[0]) if not bool(p.grad[i].ne(0).any())]
            idle[name].update(zero)
            slice_steps[name] += len(zero)

    opt.register_step_pre_hook(note)
    with safeopt.watch(opt, model) as w:
        for ids in batches(6):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    report = w.report()
    assert report, str(report)
    rows = {p.name: p.rows for p in report.params if p.rows is not None}
    for name in experts(model):
        assert idle[name], f"{name}: every expert got tokens in every step; the test needs idle ones"
        r = rows[name]
        assert r is not None
        assert r.idle_slice_steps == slice_steps[name], name
        if model.get_parameter(name).dim() >= 3:
            # torch's weight decay moves every idle expert in every step without tokens (gpt-oss's
            # expert biases start at zero: until a slice has moments, decay leaves it at zero)
            assert set(r.moved_slices) == idle[name], name
            assert r.moved_slice_steps == r.idle_slice_steps, name
            assert r.l2 > 0
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(report)


def test_watch_under_safeopt_groups_reports_idle_experts_unmoved() -> None:
    model = build("mixtral")
    opt = safeopt_adamw(model)
    with safeopt.watch(opt, model) as w:
        for ids in batches(4):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    report = w.report()
    assert not report, str(report)
    rows = [p.rows for p in report.params if p.rows is not None]
    assert rows and sum(r.idle_slice_steps for r in rows) > 0
    assert all(r.moved_slice_steps == 0 for r in rows)


# --- the Hugging Face Trainer -----------------------------------------------------------------


class Tokens(Dataset):
    def __init__(self, n: int = 8) -> None:
        self.ids = batches(n)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i][0], "labels": self.ids[i][0]}


def hf_train(
    kind: str, tmp_path: Path, out: str, *, max_steps: int, resume: str | None = None, lockstep: bool = False
) -> tuple[nn.Module, Any, Lockstep | None]:
    """Train ``kind`` with the Trainer: mixtral and deepseek_v3 through ``optimizers=``, the others
    through ``optimizer_cls_and_kwargs`` (``params`` replaces the Trainer's own groups)."""
    tf = transformers()
    model = build(kind)
    if resume is not None:
        # transformers 5.23 saves fused experts in the per-expert layout of the original
        # checkpoints, and the Trainer's resume loads them without converting back (it warns of
        # missing keys and keeps the fresh experts). from_pretrained converts: load the weights
        # with it, and let the Trainer resume the rest (optimizer, scheduler, RNG, step).
        model = tf.AutoModelForCausalLM.from_pretrained(resume)
    args = trainer_args(
        tf, str(tmp_path / out), max_steps=max_steps, per_device_train_batch_size=1, learning_rate=1e-2
    )
    found: list[Lockstep] = []

    class Attach(tf.TrainerCallback):  # type: ignore[misc]
        def on_train_begin(
            self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any
        ) -> None:
            inner = getattr(optimizer, "optimizer", optimizer)
            assert isinstance(inner, safeopt.AdamW)
            if lockstep:
                found.append(Lockstep(inner, model))

    if kind in ("mixtral", "deepseek_v3"):
        setup: dict[str, Any] = {"optimizers": (safeopt_adamw(model), None)}
    else:
        groups = safeopt.groups(model, weight_decay=0.1)
        setup = {"optimizer_cls_and_kwargs": (safeopt.AdamW, {"params": groups, "lr": 1e-2})}
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[Attach()], **setup)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, found[0] if found else None


def inner(trainer: Any) -> safeopt.AdamW:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, safeopt.AdamW)
    return opt


@pytest.mark.parametrize("kind", MODELS)
def test_hf_trainer_lockstep_and_resume_bit_identical(kind: str, tmp_path: Path) -> None:
    """Six Trainer steps checked in lockstep against the per-slice torch reference (the Trainer's
    scheduler and grad clipping included: the reference gets the lr and grads of each step);
    then three steps, a checkpoint and a resume in a fresh Trainer and optimizer: bit-identical."""
    whole, whole_trainer, lock = hf_train(kind, tmp_path, "whole", max_steps=6, lockstep=True)
    assert lock is not None and lock.steps == 6 and lock.idle_slices and lock.active_slices
    lock.remove()
    opt = inner(whole_trainer)
    assert [g["name"] for g in opt.param_groups][:1] == ["rows"]

    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed, resumed_trainer, _ = hf_train(kind, tmp_path, "resumed", max_steps=6, resume=str(checkpoint))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
    resumed_opt = inner(resumed_trainer)
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        mine, theirs = opt.state.get(p, {}), resumed_opt.state.get(q, {})
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), key
    assert any("row_step" in opt.state[p] for p in experts(whole).values())


# --- PyTorch Lightning ------------------------------------------------------------------------


def test_lightning_configure_optimizers_with_groups_equals_the_plain_loop(tmp_path: Path) -> None:
    from test_clients import lightning, trainer

    L = lightning()
    ids = batches(4)

    class Module(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = build("mixtral")

        def training_step(self, batch: Tensor, index: int) -> Tensor:
            loss: Tensor = self.net(input_ids=batch, labels=batch).loss
            return loss

        def configure_optimizers(self) -> safeopt.AdamW:
            return safeopt.AdamW(safeopt.groups(self.net, weight_decay=0.1), lr=1e-2)

    module = Module()
    trainer(L, tmp_path, max_steps=len(ids)).fit(module, torch.utils.data.DataLoader(ids, batch_size=None))

    plain = build("mixtral")
    opt = safeopt_adamw(plain)
    for batch in ids:
        plain(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for (name, a), b in zip(plain.named_parameters(), module.net.parameters(), strict=True):
        assert torch.equal(a, b), name
    inner_opt = module.trainer.optimizers[0]
    assert any("row_step" in inner_opt.state[p] for p in experts(module.net).values())
