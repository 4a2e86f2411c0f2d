"""The optimizer state our strategies allocate at build (`parallel.base.with_state`): it changes
when the memory is taken, never what training computes."""

from __future__ import annotations

import copy

import torch

from shoestring.models import ModelArgs, build_model
from shoestring.parallel.base import OptimizerSettings, make_adamw, with_state

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16)
SETTINGS = OptimizerSettings(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=0.0)


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=gen)
        model.logits(model(tokens)).float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_state_is_allocated_zeroed_and_the_weights_untouched():
    torch.manual_seed(0)
    model = build_model(ARGS)
    before = copy.deepcopy(model.state_dict())
    optimizer = with_state(make_adamw(list(model.parameters()), SETTINGS, torch.device("cpu")))
    assert [g["lr"] for g in optimizer.param_groups] == [SETTINGS.lr] * 2
    for p in model.parameters():
        state = optimizer.state[p]
        assert p.grad is None and float(state["step"]) == 0.0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_training_after_it_is_bitwise_the_lazy_optimizers():
    torch.manual_seed(0)
    lazy = build_model(ARGS)
    eager = copy.deepcopy(lazy)
    _train(lazy, make_adamw(list(lazy.parameters()), SETTINGS, torch.device("cpu")))
    _train(eager, with_state(make_adamw(list(eager.parameters()), SETTINGS, torch.device("cpu"))))
    assert all(torch.equal(a, b) for a, b in zip(lazy.parameters(), eager.parameters()))
