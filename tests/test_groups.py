"""``safeopt.groups``: a model's param groups in one line, and ``audit``'s advice where fused
experts or embedding tables are not row-lazy. The models as transformers builds them:
tests/test_moe.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import safeopt


class Experts(nn.Module):
    """A fused expert module as transformers 5 and Megatron build it: ``[E, ...]`` weights and
    (gpt-oss) ``[E, 2I]`` biases, plus a router."""

    def __init__(self, e: int = 4, h: int = 3, i: int = 2) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h))
        self.gate_up_proj_bias = nn.Parameter(torch.randn(e, 2 * i))
        self.down_proj = nn.Parameter(torch.randn(e, h, i))
        self.down_proj_bias = nn.Parameter(torch.randn(e, h))
        self.scale = nn.Parameter(torch.ones(2, 2))  # dim 0 not the number of experts


class Model(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 3)
        self.norm = nn.LayerNorm(3)
        self.router = nn.Linear(3, 4)
        self.experts = Experts()
        self.conv = nn.Conv2d(1, 2, 3)  # 4-D, but dim 0 is output channels: not experts
        self.head = nn.Linear(3, 10, bias=False)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        if tied:
            self.head.weight = self.embed.weight


def by_name(groups: list[dict]) -> dict[str, list[str]]:
    return {g["name"]: g["param_names"] for g in groups}


def test_auto_rule_puts_experts_and_untied_embeddings_in_a_rows_group() -> None:
    model = Model()
    groups = safeopt.groups(model, weight_decay=0.1, lr=1e-3)
    assert by_name(groups) == {
        "rows": ["embed.weight", "experts.gate_up_proj", "experts.down_proj"],
        "rows_no_decay": ["experts.gate_up_proj_bias", "experts.down_proj_bias"],
        "default": ["router.weight", "experts.scale", "conv.weight", "head.weight"],
        "no_decay": ["norm.weight", "norm.bias", "router.bias", "conv.bias"],
    }
    lazy = {g["name"]: (g["lazy"], g["weight_decay"], g["lr"]) for g in groups}
    assert lazy == {
        "rows": ("rows", 0.1, 1e-3),
        "rows_no_decay": ("rows", 0.0, 1e-3),
        "default": (True, 0.1, 1e-3),
        "no_decay": (True, 0.0, 1e-3),
    }
    params = dict(model.named_parameters())
    for g in groups:  # the tensors themselves, matched by identity
        assert all(p is params[n] for p, n in zip(g["params"], g["param_names"], strict=True))


def test_a_tied_embedding_is_not_row_lazy() -> None:
    groups = safeopt.groups(Model(tied=True), weight_decay=0.1)
    assert "embed.weight" in by_name(groups)["default"]
    assert "embed.weight" not in by_name(groups)["rows"]


def test_rows_by_regex_list_callable_and_none() -> None:
    model = Model()
    assert by_name(safeopt.groups(model, rows=r"^experts\.(gate_up|down)_proj$")) == {
        "rows": ["experts.gate_up_proj", "experts.down_proj"],
        "default": [n for n, p in model.named_parameters() if p.requires_grad and "_proj" not in n[-6:]],
    }
    names = by_name(safeopt.groups(model, rows=["embed.weight", model.experts.down_proj]))
    assert names["rows"] == ["embed.weight", "experts.down_proj"]
    names = by_name(safeopt.groups(model, rows=lambda name, p: p.dim() == 4))
    assert names["rows"] == ["conv.weight"]
    assert set(by_name(safeopt.groups(model, rows=None))) == {"default"}
    groups = safeopt.groups(model)  # weight_decay None: no split, no weight_decay key
    assert set(by_name(groups)) == {"rows", "default"} and all("weight_decay" not in g for g in groups)


def test_no_decay_rules() -> None:
    model = Model()
    names = by_name(safeopt.groups(model, weight_decay=0.1, rows=None, no_decay=r"^head\."))
    assert names["no_decay"] == ["head.weight"]
    names = by_name(safeopt.groups(model, weight_decay=0.1, rows=None, no_decay=None))
    assert set(names) == {"default"}
    names = by_name(safeopt.groups(model, weight_decay=0.1, rows=None, no_decay=lambda n, p: p.dim() == 1))
    assert names["no_decay"] == ["norm.weight", "norm.bias", "router.bias", "conv.bias"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": "("}, ValueError, r"groups\(rows='\('\): not a regular expression"),
        ({"rows": ["nope"]}, ValueError, "the model has no parameter named 'nope'"),
        ({"rows": [1]}, TypeError, "takes parameter names or parameters, got int"),
        ({"rows": 3}, TypeError, "got int"),
        ({"no_decay": 3}, TypeError, "got int"),
        ({"weight_decay": -1.0}, ValueError, "Invalid weight_decay value: -1.0"),
        ({"lazy": True}, TypeError, r"groups\(\) sets \['lazy'\] itself"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        safeopt.groups(Model(), **kwargs)


def test_groups_freeze_by_name_and_step_rows() -> None:
    """The groups go straight into safeopt.AdamW: idle expert slices stay, freeze by group name."""
    model = Model()
    opt = safeopt.AdamW(safeopt.groups(model, weight_decay=0.1), lr=0.1)
    experts = model.experts.gate_up_proj
    before = experts.detach().clone()
    for p in opt.param_groups[0]["params"] + opt.param_groups[2]["params"]:
        p.grad = torch.randn_like(p)
    experts.grad[1] = 0.0
    opt.step()
    assert torch.equal(experts[1], before[1]) and not torch.equal(experts[0], before[0])
    assert opt.state[experts]["row_step"].tolist() == [1.0, 0.0, 1.0, 1.0]
    opt.freeze("rows")
    assert opt.is_frozen(model.embed.weight) and not opt.is_frozen(model.router.weight)


def experts_in(report: safeopt.AuditReport) -> list[tuple[str, ...]]:
    return [f.names for f in report.findings if f.kind == "rows_not_lazy"]


def test_audit_advises_lazy_rows_for_experts_and_embeddings() -> None:
    model = Model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    report = safeopt.audit(model, torch.optim.AdamW(trainable, lr=0.1))
    assert experts_in(report) == [
        ("embed.weight",),
        ("experts.gate_up_proj",),
        ("experts.gate_up_proj_bias",),
        ("experts.down_proj",),
        ("experts.down_proj_bias",),
    ]
    assert 'lazy="rows"' in str(report) and "experts, shape 4x4x3, group 0, position" in str(report)
    report = safeopt.audit(model, safeopt.AdamW(safeopt.groups(model, weight_decay=0.1), lr=0.1))
    assert not report, str(report)


def test_audit_advises_rows_for_a_torch_optimizer_given_safeopt_groups() -> None:
    """torch's AdamW keeps a group's lazy key and ignores it: its idle experts still move."""
    model = torch.nn.Module()
    model.experts = torch.nn.Module()
    model.experts.w = torch.nn.Parameter(torch.ones(4, 3, 2))
    plain = torch.optim.AdamW(safeopt.groups(model, weight_decay=0.1), lr=0.1)
    assert "rows_not_lazy" in safeopt.audit(model, plain).kinds()
    assert "rows_not_lazy" not in safeopt.audit(model, safeopt.AdamW(safeopt.groups(model), lr=0.1)).kinds()


def test_auto_rows_skip_single_tokens_and_4d_weights_and_keep_a_shared_embedding() -> None:
    model = torch.nn.Module()
    model.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 8))  # ViT's: one slice
    model.conv = torch.nn.Module()
    model.conv.weight = torch.nn.Parameter(torch.zeros(8, 3, 3, 3))  # a custom convolution
    shared = torch.nn.Embedding(10, 4)
    model.enc, model.dec = torch.nn.Module(), torch.nn.Module()
    model.enc.embed = model.dec.embed = shared  # one module in two places (T5-style), not tied
    from safeopt._groups import row_tables

    assert row_tables(model) == {id(shared.weight): "embedding"}


def test_groups_refuses_a_bool_weight_decay() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        safeopt.groups(torch.nn.Linear(2, 2), weight_decay=True)


def test_rows_by_the_second_name_of_a_tied_weight() -> None:
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(6, 4)
    model.head = torch.nn.Linear(4, 6, bias=False)
    model.head.weight = model.emb.weight
    (group,) = [g for g in safeopt.groups(model, rows=["head.weight"]) if g.get("lazy") == "rows"]
    assert group["params"] == [model.emb.weight]
