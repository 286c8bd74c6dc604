"""The ghost update in a mixture-of-experts model as transformers 5 builds it, and the one line
that stops it.

A tiny Mixtral from a config (8 experts, top-2, 4 tokens a batch, random init, nothing
downloaded) trains 12 steps on the CPU, twice from the same start with the same batches: with
``torch.optim.AdamW(weight_decay=0.1)``, then with
``safeopt.AdamW(safeopt.groups(model, weight_decay=0.1))``. ``safeopt.watch`` records both runs:
every expert that got no token in a step has an all-zero slice in the fused ``[E, ...]`` grad, and
torch's AdamW moves it anyway; safeopt moves none of them.

Run: ``python examples/moe_transformers.py`` (needs ``pip install -e ".[transformers]"``)
"""

import os
import sys

import torch

import safeopt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import transformers
except ImportError:
    print('transformers is not installed: pip install -e ".[transformers]" to run this example')
    sys.exit(0)
transformers.logging.set_verbosity_error()

STEPS, TOKENS, EXPERTS = 12, 4, 8


def model() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def train(make_optimizer) -> safeopt.WatchReport:
    net = model()
    opt = make_optimizer(net)
    gen = torch.Generator().manual_seed(1)
    with safeopt.watch(opt, net) as w:
        for _ in range(STEPS):
            ids = torch.randint(0, 32, (1, TOKENS), generator=gen)
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return w.report()


def experts(report: safeopt.WatchReport) -> tuple[int, int]:
    """(idle expert slices, of them moved) over the fused expert parameters."""
    rows = [p.rows for p in report.params if ".experts." in p.name and p.rows is not None]
    return sum(r.idle_slice_steps for r in rows), sum(r.moved_slice_steps for r in rows)


torch_report = train(lambda net: torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1))
safe_report = train(lambda net: safeopt.AdamW(safeopt.groups(net, weight_decay=0.1), lr=1e-2))

print("torch.optim.AdamW(weight_decay=0.1):")
print(torch_report)
print()
print("safeopt.AdamW(safeopt.groups(model, weight_decay=0.1)):")
print(safe_report)
print()
idle, moved = experts(torch_report)
safe_idle, safe_moved = experts(safe_report)
print(f"torch:   {moved} of {idle} idle expert slices moved")
print(f"safeopt: {safe_moved} of {safe_idle} idle expert slices moved")
assert idle and moved == idle, "torch's weight decay moves every expert without tokens"
assert safe_idle and safe_moved == 0 and not safe_report
