"""Per-block conditioning (``DiTConfig.per_block_conditioning``): one timestep/label embedder per block, the layout
of a DiT built or trained in diffusers. DiTFast against the reference (outputs, guidance, every gradient, the batched
inference paths), the state-dict layout, the cost model and step caching."""

from __future__ import annotations

import pytest
import torch

from dit_fast import cache as C
from dit_fast.config import DiTConfig, param_count
from dit_fast.model import DiTFast
from dit_fast.reference import DiT
from tests.test_model import check_against_reference, close, inputs, pair

PER_BLOCK = dict(per_block_conditioning=True, depth=3)


@pytest.mark.parametrize("config", [
    dict(PER_BLOCK),
    dict(PER_BLOCK, numerics="diffusers", learn_sigma=False, patch_size=4, hidden_size=48, num_heads=3),
    dict(PER_BLOCK, class_dropout_prob=0.0, input_size=(8, 12)),
])
def test_matches_reference(config):
    ref, fast = pair(**config)
    check_against_reference(ref, fast, n=4)
    with torch.no_grad():
        fast(*inputs(fast))
    assert "conditioning" in fast._stack_cache and "adaln" in fast._stack_cache, "inference should batch per block"


def test_every_embedder_conditions_its_block():
    ref, fast = pair(**PER_BLOCK)
    x, t, y = inputs(ref)
    with torch.no_grad():
        before = fast(x, t, y)
        for i in range(ref.config.depth):  # a change in any one copy changes the output (and the same in both)
            for model in (ref, fast):
                model.t_embedder[i].mlp[2].bias.add_(0.5)
                model.y_embedder[i].embedding_table.weight.mul_(1.5)
            after = fast(x, t, y)
            assert (after - before).abs().max() > 1e-3, f"embedder {i} has no effect"
            close(after, ref(x, t, y), f"after changing embedder {i}")
            before = after


def test_layout_and_cost():
    model = DiT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=10, per_block_conditioning=True)
    keys = set(model.state_dict())
    assert {"t_embedder.2.mlp.0.weight", "y_embedder.2.embedding_table.weight"} <= keys
    assert "t_embedder.mlp.0.weight" not in keys
    trainable = sum(p.numel() for p in model.parameters())
    assert param_count(model) == trainable
    shared = DiT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    assert "t_embedder.mlp.0.weight" in shared.state_dict() and param_count(shared) < trainable
    assert DiTConfig.from_dict(model.config.to_dict()) == model.config
    assert DiTConfig.from_dict({k: v for k, v in shared.config.to_dict().items()
                                if k != "per_block_conditioning"}) == shared.config  # configs stored before the field


def test_training_drops_the_same_labels_in_every_block():
    torch.manual_seed(0)
    fast = DiTFast(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=10, class_dropout_prob=0.5,
                   per_block_conditioning=True).train()
    for i in range(1, 3):  # identical copies: a per-block drop would make the blocks' conditionings differ
        fast.t_embedder[i].load_state_dict(fast.t_embedder[0].state_dict())
        fast.y_embedder[i].load_state_dict(fast.y_embedder[0].state_dict())
    t, y = torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            c = fast.conditioning(t, y)  # (depth, N, D)
        assert torch.allclose(c[1], c[0]) and torch.allclose(c[2], c[0])


def test_step_cache_matches_reference():
    ref, fast = pair(**PER_BLOCK)
    x, t, y = inputs(ref)
    outs = {}
    for name, model in (("ref", ref), ("fast", fast)):
        with torch.no_grad(), C.step_cache(model, "fora:2") as cache:
            outs[name] = [model(x, t - k, y) for k in range(3)]
        assert cache.cached_steps == 1
    for k in range(3):
        close(outs["fast"][k], outs["ref"][k], f"step {k}")
