"""safeopt.groups: a model's param groups, with its expert and embedding tables row-lazy.

One rule, ``row_tables``, says which parameters are stepped by rows under ``rows="auto"``; the
audit reads the same rule to advise where ``lazy="rows"`` is missing.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from safeopt._row_rule import ROWS

__all__ = ["groups", "no_decay_names", "row_tables"]

# The Trainer's rule (transformers' ``Trainer.get_decay_parameter_names``): no weight decay for a
# parameter inside an ``nn.LayerNorm`` or whose lowercased qualified name matches one of these.
_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

RowsRule = str | Iterable[str | Tensor] | Callable[[str, Tensor], bool] | None
DecayRule = str | Callable[[str, Tensor], bool] | None

_RESERVED = ("params", "param_names", "lazy", "weight_decay", "name")


def row_tables(model: nn.Module) -> dict[int, str]:
    """The parameters ``rows="auto"`` steps by rows, by ``id``, with the reason for each:

    - ``"experts"``: a parameter of three dimensions, more than one along dim 0, held directly by
      a module that is not a convolution (transformers 5's fused ``experts.gate_up_proj`` / ``down_proj``
      ``[E, ...]``, Megatron-style grouped GEMM weights), and every parameter of two or more
      dimensions of the same module whose dim 0 has the same size (gpt-oss's ``[E, 2I]`` expert
      biases). A dense layer's weight is two-dimensional; a convolution's dim 0 is its output
      channels, which every input reaches.
    - ``"embedding"``: the weight of an ``nn.Embedding`` or ``nn.EmbeddingBag``, unless it is tied
      to another module (an output head reads every row, so every row has a gradient in every
      step and reading it by rows is pure cost).
    """
    holders: dict[int, int] = defaultdict(int)  # modules holding each parameter (a shared module once)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] += 1
    found: dict[int, str] = {}
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            weight = module.weight
            if weight.dim() >= 2 and holders[id(weight)] == 1:
                found.setdefault(id(weight), "embedding")
            continue
        if isinstance(module, _CONVS):
            continue
        # exactly three dimensions and more than one expert: a 4-D weight is a convolution's
        # (custom ones included), a [1, ...] tensor a single token (ViT's cls_token)
        sizes = {p.shape[0] for p in own if p.dim() == 3 and p.shape[0] > 1}
        for p in own:
            if p.dim() >= 2 and p.shape[0] in sizes:
                found.setdefault(id(p), "experts")
    return found


def no_decay_names(model: nn.Module) -> set[str]:
    """Qualified names (``named_parameters()``) that the Trainer gives no weight decay: biases
    and norm layers, as ``transformers.Trainer.get_decay_parameter_names`` decides."""
    patterns = [re.compile(p) for p in _NO_DECAY_PATTERNS]
    in_layer_norm: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            in_layer_norm.update(id(p) for p in module.parameters())
    return {
        name
        for name, p in model.named_parameters()
        if id(p) in in_layer_norm or any(pattern.search(name.lower()) for pattern in patterns)
    }


def _searcher(argument: str, pattern: str) -> Callable[[str, Tensor], bool]:
    """A predicate true for the names ``pattern`` (a regular expression) is found in."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"groups({argument}={pattern!r}): not a regular expression ({e})") from None
    return lambda name, p: compiled.search(name) is not None


def _rows_predicate(model: nn.Module, rows: RowsRule) -> Callable[[str, Tensor], bool]:
    if rows is None:
        return lambda name, p: False
    if isinstance(rows, str):
        if rows == "auto":
            auto = row_tables(model)
            return lambda name, p: id(p) in auto
        return _searcher("rows", rows)
    if callable(rows):
        return rows
    if isinstance(rows, Iterable):
        # every name of a parameter, a tied weight's second name too
        named = dict(model.named_parameters(remove_duplicate=False))
        chosen_ids: set[int] = set()
        for item in rows:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(
                        f"groups(rows=[..., {item!r}, ...]): the model has no parameter named {item!r} "
                        f"(names are model.named_parameters()'s, e.g. {next(iter(named), '')!r})"
                    )
                chosen_ids.add(id(named[item]))
            elif isinstance(item, Tensor):
                chosen_ids.add(id(item))
            else:
                raise TypeError(
                    f"groups(rows=[...]) takes parameter names or parameters, got {type(item).__name__}"
                )
        return lambda name, p: id(p) in chosen_ids
    raise TypeError(
        f'groups(rows=...) takes "auto", a regular expression, a list of names or parameters, a '
        f"callable (name, param) -> bool, or None; got {type(rows).__name__}"
    )


def _decay_predicate(model: nn.Module, no_decay: DecayRule) -> Callable[[str, Tensor], bool]:
    """Whether a parameter gets no weight decay."""
    if no_decay is None:
        return lambda name, p: False
    if isinstance(no_decay, str):
        if no_decay == "auto":
            names = no_decay_names(model)
            return lambda name, p: name in names
        return _searcher("no_decay", no_decay)
    if callable(no_decay):
        return no_decay
    raise TypeError(
        f'groups(no_decay=...) takes "auto", a regular expression, a callable (name, param) -> bool, '
        f"or None; got {type(no_decay).__name__}"
    )


def groups(
    model: nn.Module,
    *,
    weight_decay: float | None = None,
    rows: RowsRule = "auto",
    no_decay: DecayRule = "auto",
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Param groups for ``model``: its expert and embedding tables with ``lazy="rows"``, the rest
    with ``lazy=True``, weight decay split as the Hugging Face Trainer splits it.

    Pass the result to ``safeopt.AdamW`` / ``Adam`` / ``SGD`` (or any torch optimizer, which keeps
    the extra keys and ignores them). Only trainable parameters (``requires_grad=True``) are
    included, each once (tied weights under their first name), in ``named_parameters()`` order.

    Args:
        model: The model.
        weight_decay: The decay of the parameters that get it; those that do not get 0.0. None:
            no split, and no group sets ``weight_decay`` (the optimizer's default applies).
        rows: Which parameters are stepped by rows (each slice along dim 0 an expert or an
            embedding row, idle when its grad is all zero). ``"auto"``: every parameter of three
            or more dimensions of a module that is not a convolution (fused experts
            ``[E, ...]``), the other parameters of that module with the same dim 0 (gpt-oss's
            ``[E, 2I]`` expert biases), and the weight of each ``nn.Embedding`` /
            ``nn.EmbeddingBag`` not tied to an output head. A string: a regular expression
            searched in each qualified name. A list: names or parameters. A callable
            ``(name, param) -> bool``. None: no rows group.
        no_decay: Which parameters get no weight decay. ``"auto"``: the Trainer's rule
            (``Trainer.get_decay_parameter_names``: biases, parameters inside ``nn.LayerNorm``,
            names with ``layernorm``, ``rmsnorm``, ``norm`` as a component, or ``_norm``). A
            regular expression, a callable ``(name, param) -> bool``, or None (all decay).
        **group_kwargs: Further keys for every group (``lr``, ``betas``, ...).

    Returns:
        Up to four groups, the empty ones left out, named ``"rows"``, ``"rows_no_decay"``,
        ``"default"`` and ``"no_decay"`` (``group["name"]``: ``opt.freeze("rows")`` works), each
        with ``param_names`` (the qualified names, which ``watch`` and ``audit`` report).

    Example:
        ```python
        opt = safeopt.AdamW(safeopt.groups(model, weight_decay=0.1), lr=1e-4)
        # Hugging Face Trainer: Trainer(..., optimizers=(opt, None)), or
        # optimizer_cls_and_kwargs=(safeopt.AdamW, {"params": safeopt.groups(model, weight_decay=0.1), "lr": 1e-4})
        ```
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"groups() takes an nn.Module, got {type(model).__name__}")
    reserved = sorted(set(group_kwargs) & set(_RESERVED))
    if reserved:
        raise TypeError(f"groups() sets {reserved} itself: pass weight_decay=, rows= or no_decay= instead")
    if weight_decay is not None and (
        isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0
    ):
        raise ValueError(f"Invalid weight_decay value: {weight_decay!r} (a float >= 0, or None)")
    by_rows = _rows_predicate(model, rows)
    undecayed = _decay_predicate(model, no_decay)
    buckets: dict[tuple[bool, bool], list[tuple[str, Tensor]]] = {
        key: [] for key in ((True, True), (True, False), (False, True), (False, False))
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = weight_decay is None or not undecayed(name, p)
        buckets[(bool(by_rows(name, p)), decays)].append((name, p))
    out = []
    for (in_rows, decays), members in buckets.items():
        if not members:
            continue
        group: dict[str, Any] = {
            "params": [p for _, p in members],
            "param_names": [n for n, _ in members],
            "name": ("rows" if in_rows else "default")
            if decays
            else ("rows_no_decay" if in_rows else "no_decay"),
            "lazy": ROWS if in_rows else True,
            **group_kwargs,
        }
        if weight_decay is not None:
            group["weight_decay"] = float(weight_decay) if decays else 0.0
        out.append(group)
    return out
