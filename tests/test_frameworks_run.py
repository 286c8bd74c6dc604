"""Real frameworks, unmodified user code, under ``python -m safeopt watch`` and ``run``.

Hugging Face ``Trainer`` with its default optimizer (``optim="adamw_torch_fused"`` in transformers 5,
``"adamw_torch"`` before: torch's AdamW, imported inside transformers when the optimizer is made) on a tiny GPT-2 built from a config (no
downloads), and Lightning with a ``configure_optimizers`` that returns ``torch.optim.AdamW``. Each
model has a side branch that a zero gate leaves with all-zero grads. Under ``watch`` the run is
the unwatched one, bit for bit, and the report names the branch; under ``run`` it is the run with
safeopt's class put in by hand (``optimizer_cls_and_kwargs`` for the Trainer, ``safeopt.AdamW``
in ``configure_optimizers``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from script_runs import by_hand, ok, python_cmd, safeopt_cmd, same_params, together

HF = """\
import sys
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class Model(nn.Module):
    # A tiny GPT-2 with a side branch whose gate is zero: the branch gets all-zero grads.

    def __init__(self):
        super().__init__()
        config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
        self.lm = GPT2LMHeadModel(config)
        self.side = nn.Linear(16, 16)

    def forward(self, input_ids, labels=None):
        out = self.lm(input_ids=input_ids, labels=labels, output_hidden_states=True)
        side = self.side(out.hidden_states[-1]).pow(2).mean()
        return {"loss": out.loss + 0.0 * side, "logits": out.logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (16, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


torch.manual_seed(0)
model = Model()
args = TrainingArguments(
    output_dir=sys.argv[2], max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
    weight_decay=0.1, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
    disable_tqdm=True, seed=0, dataloader_num_workers=0,
)
trainer = Trainer(model=model, args=args, train_dataset=Data())  # the default optim: adamw_torch_fused in transformers 5 (adamw_torch in 4)
trainer.train()
inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
print("optimizer:", type(inner).__name__, isinstance(inner, torch.optim.AdamW))
torch.save(model.state_dict(), sys.argv[1])
"""

LIGHTNING = """\
import sys
import torch
import lightning as L
from torch import nn


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.branch = nn.Linear(8, 8)  # gated off: all-zero grads
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = torch.relu(self.body(x))
        h = h + 0.0 * self.branch(h)
        return self.head(h).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 8)), batch_size=8)
module = Module()
trainer = L.Trainer(
    max_steps=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False,
)
trainer.fit(module, data)
print("optimizer:", type(trainer.optimizers[0]).__name__, isinstance(trainer.optimizers[0], torch.optim.AdamW))
torch.save(module.state_dict(), sys.argv[1])
"""


def timeless(stdout: str) -> list[str]:
    """The Trainer's output but its timings (train_runtime, samples per second)."""
    return [line for line in stdout.splitlines() if "train_runtime" not in line]


def idle_rows(stderr: str) -> set[str]:
    """The parameters in the report's table (a row: name, shape, idle steps, moved, drift, max abs)."""
    names = set()
    for line in stderr.splitlines():
        cells = line.split()
        if len(cells) == 6 and cells[2].isdigit() and cells[3].isdigit():
            names.add(cells[0])
    return names


@pytest.fixture
def hf(tmp_path: Path) -> Path:
    pytest.importorskip("transformers")
    (tmp_path / "train.py").write_text(HF)
    return tmp_path


@pytest.fixture
def lightning(tmp_path: Path) -> Path:
    pytest.importorskip("lightning")
    (tmp_path / "train.py").write_text(LIGHTNING)
    return tmp_path


def test_hf_trainer_under_watch_is_the_unwatched_run(hf: Path) -> None:
    plain, watched = map(
        ok,
        together(
            python_cmd("train.py", "plain.pt", "out"),
            safeopt_cmd("watch", "train.py", "watched.pt", "out"),
            cwd=hf,
        ),
    )
    assert same_params(hf / "plain.pt", hf / "watched.pt")
    assert timeless(watched.stdout) == timeless(plain.stdout) and "optimizer: AdamW True" in plain.stdout
    assert "torch.optim.adamw.AdamW" in watched.stderr and "verdict: affected" in watched.stderr
    # side.bias has no weight decay in the Trainer's groups: idle, but not moved by AdamW
    assert idle_rows(watched.stderr) == {"side.weight", "side.bias"}
    # GPT-2's position table: the positions past the batches' length never get a gradient, and
    # AdamW's weight decay moves them: the fix steps that table by rows
    assert "fix: python -m safeopt run --rows 'lm\\.transformer\\.wpe\\.weight' train.py watched.pt out" in (
        watched.stderr
    )


@pytest.mark.parametrize("optim", [None, "adamw_torch"], ids=["default optim", "adamw_torch"])
def test_hf_trainer_under_run_is_safeopt_put_in_by_hand(hf: Path, optim: str | None) -> None:
    script = HF
    if optim is not None:  # the user's script names the optimizer
        script = by_hand(script, "seed=0,", f"seed=0, optim={optim!r},")
        (hf / "train.py").write_text(script)
    fused = ", 'fused': True" if optim is None else ""  # transformers 5's default is the fused one
    hand = by_hand(
        script,
        "train_dataset=Data())",
        "train_dataset=Data(), optimizer_cls_and_kwargs=(safeopt.AdamW, "
        f"{{'lr': 1e-2, 'betas': (0.9, 0.999), 'eps': 1e-8{fused}}}))",
    )
    (hf / "by_hand.py").write_text("import safeopt\n" + hand)
    done, _ = map(
        ok,
        together(
            safeopt_cmd("run", "train.py", "run.pt", "out"),
            python_cmd("by_hand.py", "hand.pt", "out"),
            cwd=hf,
        ),
    )
    assert same_params(hf / "run.pt", hf / "hand.pt")
    assert "optimizer: AdamW True" in done.stdout
    assert "safeopt.AdamW x1 (4 step(s))" in done.stderr


def test_lightning_under_watch_is_the_unwatched_run(lightning: Path) -> None:
    plain, watched = map(
        ok,
        together(
            python_cmd("train.py", "plain.pt"), safeopt_cmd("watch", "train.py", "watched.pt"), cwd=lightning
        ),
    )
    assert same_params(lightning / "plain.pt", lightning / "watched.pt")
    assert watched.stdout == plain.stdout
    assert idle_rows(watched.stderr) == {"branch.weight", "branch.bias"}
    assert "verdict: affected" in watched.stderr


def test_lightning_under_run_is_safeopt_put_in_by_hand(lightning: Path) -> None:
    hand = by_hand(LIGHTNING, "return torch.optim.AdamW(", "return safeopt.AdamW(")
    (lightning / "by_hand.py").write_text("import safeopt\n" + hand)
    done, _ = map(
        ok,
        together(
            safeopt_cmd("run", "train.py", "run.pt"), python_cmd("by_hand.py", "hand.pt"), cwd=lightning
        ),
    )
    assert same_params(lightning / "run.pt", lightning / "hand.pt")
    assert (
        not same_params(lightning / "run.pt", lightning / "plain.pt")
        if (lightning / "plain.pt").exists()
        else True
    )
    assert "optimizer: AdamW True" in done.stdout
    assert "8 with an all-zero grad" in done.stderr  # branch.weight and .bias, four steps
