"""Optimizers by name: each steps a tiny model, takes its options, and resumes bit exactly in a training run."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch
from test_train import args, summary

from training.config import OptimizationOptions
from training.optimizers import OPTIMIZERS, build_optimizer, parse_optimizer_args
from training.train import main


def two_steps(name: str, **options) -> tuple[torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
    """Two steps of `name` on a tiny regression model (a 64x64 layer: bitsandbytes quantizes >= 4096 values)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    lr = 1.0 if name == "prodigy" else 1e-3
    optimizer = build_optimizer(name, [{"params": list(model.parameters())}],
                                OptimizationOptions(learning_rate=lr, lr_scheduler="constant"), options)
    if hasattr(optimizer, "train"):
        optimizer.train()
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return before, after, optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_takes_two_steps(name):
    before, after, optimizer = two_steps(name)
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        assert isinstance(optimizer, bnb.optim.AdamW8bit)
        assert any(state.get("state1") is not None and state["state1"].dtype == torch.uint8
                   for state in optimizer.state.values())  # 8-bit states


def test_optimizer_args_reach_the_optimizer():
    assert parse_optimizer_args(["d_coef=0.5", "betas=[0.9, 0.95]", "decouple=true"]) == {
        "d_coef": 0.5, "betas": [0.9, 0.95], "decouple": True}
    _, _, prodigy = two_steps("prodigy", d_coef=0.5)
    assert prodigy.param_groups[0]["d_coef"] == 0.5
    with pytest.raises(ValueError, match="not key=value"):
        parse_optimizer_args(["d_coef"])
    with pytest.raises(ValueError, match="do not fit --optimizer lion"):
        two_steps("lion", d_coef=0.5)


def test_adamw8bit_falls_back_with_a_clear_message_without_bitsandbytes(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with caplog.at_level(logging.WARNING):
        _, after, optimizer = two_steps("adamw8bit")
    assert type(optimizer) is torch.optim.AdamW and "training with 32-bit AdamW instead" in caplog.text


def test_schedulefree_needs_a_constant_schedule():
    with pytest.raises(ValueError, match="--lr_scheduler constant"):
        build_optimizer("schedulefree_adamw", [{"params": [torch.nn.Parameter(torch.zeros(2))]}], OptimizationOptions())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_equals_uninterrupted_with_each_optimizer(tmp_path, name):
    lr = "1.0" if name == "prodigy" else "1e-3"
    extra = ["--optimizer", name, "--learning_rate", lr, "--lr_scheduler", "constant", "--checkpointing_steps", "2",
             "--train_text_encoder", "--train_batch_size", "2"]
    main(args(tmp_path / "full", *extra, steps=4))
    main(args(tmp_path / "parted", *extra, steps=2))
    main(args(tmp_path / "parted", *extra, "--resume_from_checkpoint", "latest", steps=4))
    assert summary(tmp_path / "parted")["loss_history"] == summary(tmp_path / "full")["loss_history"][2:]
    assert summary(tmp_path / "parted")["final_validation_loss"] == summary(tmp_path / "full")["final_validation_loss"]
    assert json.loads((tmp_path / "full" / "config.json").read_text())["finetune_model"]["optimizer"] == name
