"""Real clients drive safeopt optimizers: PyTorch Lightning and the Hugging Face Trainer.

Optional extras (``pip install -e ".[lightning]"``, ``".[transformers]"``); each group of tests is
skipped with the reason when its package is not installed. CI installs both. Each run is compared
with the same training written as a plain loop, or with torch.optim, using torch.equal.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import safeopt
from cases import trainer_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests build their models from configs: no downloads
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def equal_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def data(n: int = 8, width: int = 4) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, width, generator=gen), torch.randn(n, 1, generator=gen))


def optional(module: str, extra: str) -> Any:
    """The module; skipped with the reason when it is missing, except in CI, which installs it."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f'{module} is not installed (pip install -e ".[{extra}]")')


# --- PyTorch Lightning ----------------------------------------------------------------------------


def lightning() -> Any:
    return optional("lightning.pytorch", "lightning")


def trainer(L: Any, tmp_path: Path, **kwargs: Any) -> Any:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LitLogger.*")
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Linear(4, 1)
        self.right = nn.Linear(4, 1)

    def loss(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        branch = self.left if batch_idx % 2 == 0 else self.right
        return (branch(x) - y).pow(2).mean()


def test_lightning_configure_optimizers_returns_a_safeopt_optimizer(tmp_path: Path) -> None:
    """Automatic optimization (Lightning passes a closure to step()), branches used in turn,
    zero_grad(set_to_none=False): equal to the plain loop; torch.optim.AdamW moves the idle branch."""
    L = lightning()

    class Module(L.LightningModule):
        def __init__(self, opt_cls: type) -> None:
            super().__init__()
            self.net = TwoBranch()
            self.opt_cls = opt_cls
            self.idle_stayed: list[bool] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            idle = self.net.right if batch_idx % 2 == 0 else self.net.left
            self.before = [p.detach().clone() for p in idle.parameters()]
            self.idle = idle
            return self.net.loss(batch, batch_idx)

        def on_train_batch_end(self, *args: Any) -> None:
            self.idle_stayed.append(
                all(torch.equal(p, b) for p, b in zip(self.idle.parameters(), self.before))
            )

        def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
            optimizer.zero_grad(set_to_none=False)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.opt_cls(self.parameters(), lr=0.05, weight_decay=0.1)

    def fit(opt_cls: type) -> Any:
        module = Module(opt_cls)
        trainer(L, tmp_path, max_epochs=2).fit(module, DataLoader(data(), batch_size=2))
        return module

    ours, theirs = fit(safeopt.AdamW), fit(torch.optim.AdamW)
    assert isinstance(ours.trainer.optimizers[0], safeopt.AdamW)
    assert ours.idle_stayed == [True] * 8
    assert not all(theirs.idle_stayed[2:]), "torch.optim.AdamW should move the idle branch (ghost update)"

    plain = TwoBranch()
    opt = safeopt.AdamW(plain.parameters(), lr=0.05, weight_decay=0.1)
    for _ in range(2):
        for batch_idx, batch in enumerate(DataLoader(data(), batch_size=2)):
            opt.zero_grad(set_to_none=False)
            plain.loss(batch, batch_idx).backward()
            opt.step()
    assert equal_params(ours.net, plain)


def test_lightning_base_finetuning_unfreeze_and_add_param_group(tmp_path: Path) -> None:
    """BaseFinetuning freezes the backbone, then adds it as a new param group at epoch 1 through
    add_param_group: safeopt fills its flags, and training equals torch.optim.Adam's exactly."""
    L = lightning()
    from lightning.pytorch.callbacks import BaseFinetuning

    class Unfreeze(BaseFinetuning):
        def freeze_before_training(self, pl_module: Any) -> None:
            self.freeze(pl_module.backbone, train_bn=False)

        def finetune_function(self, pl_module: Any, current_epoch: int, optimizer: Any) -> None:
            if current_epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.01)

    class Module(L.LightningModule):
        def __init__(self, opt_cls: type) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
            self.head = nn.Linear(8, 1)
            self.opt_cls = opt_cls
            self.backbone_after_epoch: list[torch.Tensor] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return (self.head(self.backbone(x)) - y).pow(2).mean()

        def on_train_epoch_end(self) -> None:
            self.backbone_after_epoch.append(self.backbone[0].weight.detach().clone())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.opt_cls(filter(lambda p: p.requires_grad, self.parameters()), lr=0.05)

    def fit(opt_cls: type) -> Any:
        module = Module(opt_cls)
        start = module.backbone[0].weight.detach().clone()
        trainer(L, tmp_path, max_epochs=3, callbacks=[Unfreeze()]).fit(
            module, DataLoader(data(), batch_size=4)
        )
        return module, start

    (ours, start), (theirs, _) = fit(safeopt.Adam), fit(torch.optim.Adam)
    opt = ours.trainer.optimizers[0]
    assert isinstance(opt, safeopt.Adam) and len(opt.param_groups) == 2
    added = opt.param_groups[1]
    assert (
        added["lr"] == 0.01
        and added["frozen"] is False
        and added["lazy"] is True
        and added["frozen_params"] == []
    )
    assert opt.is_frozen(ours.backbone) is False
    assert torch.equal(ours.backbone_after_epoch[0], start)  # frozen during epoch 0
    assert not torch.equal(ours.backbone_after_epoch[1], start)  # trained from epoch 1 on
    assert equal_params(ours, theirs)
    assert torch.equal(ours.backbone[1].running_mean, theirs.backbone[1].running_mean)


class Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 4))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def gan_step(
    gen: nn.Module, disc: nn.Module, opt: Any, real: torch.Tensor, step: int, backward: Any
) -> list[bool]:
    """One discriminator step and one generator step with one optimizer; returns, for each, whether
    the frozen net stayed bit-identical. Grads reach the frozen net in both steps."""
    z = torch.randn(real.shape[0], 2, generator=torch.Generator().manual_seed(step))
    stayed = []
    with opt.frozen("generator"):
        opt.zero_grad(set_to_none=False)
        fake = gen(z)  # not detached: the generator gets nonzero grads from the discriminator loss
        backward(nn.functional.softplus(-disc(real)).mean() + nn.functional.softplus(disc(fake)).mean())
        before = [p.detach().clone() for p in gen.parameters()]
        opt.step()
        stayed.append(all(torch.equal(p, b) for p, b in zip(gen.parameters(), before)))
    with opt.frozen("discriminator"):
        opt.zero_grad(set_to_none=False)
        backward(nn.functional.softplus(-disc(gen(z))).mean())
        before = [p.detach().clone() for p in disc.parameters()]
        opt.step()
        stayed.append(all(torch.equal(p, b) for p, b in zip(disc.parameters(), before)))
    return stayed


def gan_nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return Generator(), nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


def gan_optimizer(gen: nn.Module, disc: nn.Module) -> safeopt.Adam:
    return safeopt.Adam(
        [
            {"params": gen.parameters(), "name": "generator"},
            {"params": disc.parameters(), "name": "discriminator"},
        ],
        lr=2e-3,
        betas=(0.5, 0.999),
        weight_decay=0.01,
    )


def test_lightning_manual_optimization_gan_with_one_optimizer_and_freeze(tmp_path: Path) -> None:
    """automatic_optimization = False, self.optimizers() (a LightningOptimizer around the safeopt
    optimizer) used with frozen(...) for each half: equal to the plain loop, frozen nets held still."""
    L = lightning()
    reals = DataLoader(
        TensorDataset(torch.randn(8, 4, generator=torch.Generator().manual_seed(3))), batch_size=2
    )

    class GAN(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.gen, self.disc = gan_nets()
            self.automatic_optimization = False
            self.stayed: list[bool] = []

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            assert isinstance(opt, safeopt.Adam)  # Lightning's wrapper imitates the class
            self.stayed += gan_step(
                self.gen, self.disc, opt, batch[0], self.global_step, self.manual_backward
            )

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return gan_optimizer(self.gen, self.disc)

    module = GAN()
    trainer(L, tmp_path, max_epochs=2).fit(module, reals)
    assert module.stayed == [True] * 16

    gen, disc = gan_nets()
    opt = gan_optimizer(gen, disc)
    step = 0
    for _ in range(2):
        for (real,) in reals:
            gan_step(gen, disc, opt, real, step, lambda loss: loss.backward())
            step += 2  # Lightning's global_step counts each opt.step() in manual optimization
    assert equal_params(module.gen, gen) and equal_params(module.disc, disc)
    assert not module.trainer.optimizers[0].is_frozen("generator")  # frozen() restored the flags


# --- Hugging Face transformers Trainer ------------------------------------------------------------


def transformers() -> Any:
    return optional("transformers", "transformers")


class Tokens(Dataset):
    def __init__(self, n: int = 32) -> None:
        gen = torch.Generator().manual_seed(2)
        self.ids = torch.randint(0, 64, (n, 8), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def hf_model() -> Any:
    """A tiny randomly initialised BERT classifier, built from a config: nothing is downloaded."""
    tf = transformers()
    config = tf.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(config)


def hf_train(tmp_path: Path, out: str, *, max_steps: int, resume: str | None = None) -> tuple[Any, Any]:
    """safeopt.AdamW through ``optimizers=``; the embeddings frozen through safeopt (they still
    get grads, and AdamW would decay them)."""
    tf = transformers()
    model = hf_model()
    opt = safeopt.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    if resume is None:
        opt.freeze(model.bert.embeddings)  # after a resume the flag comes back from the checkpoint
    args = trainer_args(tf, str(tmp_path / out), max_steps=max_steps, per_device_train_batch_size=4)
    trainer = tf.Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_hf_trainer_with_safeopt_adamw_frozen_embeddings_and_resume(tmp_path: Path) -> None:
    """Six steps uninterrupted, against three steps, a checkpoint, and a resume in a fresh Trainer
    with a fresh optimizer: bit-identical, embeddings (frozen through safeopt) untouched."""
    whole, whole_trainer = hf_train(tmp_path, "whole", max_steps=6)
    opt = whole_trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it in an AcceleratedOptimizer
    assert isinstance(inner, safeopt.AdamW)

    fresh = hf_model()
    emb = dict(whole.bert.embeddings.named_parameters())
    for name, p in fresh.bert.embeddings.named_parameters():
        assert torch.equal(p, emb[name]), f"frozen embedding {name} moved"
    assert not torch.equal(fresh.classifier.weight, whole.classifier.weight)
    assert any(int(s["step"]) == 6 for s in inner.state.values())

    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert checkpoint.is_dir()
    resumed, resumed_trainer = hf_train(tmp_path, "resumed", max_steps=6, resume=str(checkpoint))
    resumed_opt = getattr(resumed_trainer.optimizer, "optimizer", resumed_trainer.optimizer)
    assert resumed_opt.is_frozen(resumed.bert.embeddings), "the freeze did not travel in optimizer.pt"
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name
