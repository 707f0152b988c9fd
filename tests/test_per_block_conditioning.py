"""Per-block conditioning (``DiTConfig.per_block_conditioning``): one timestep/label embedder per block, the layout
of a DiT built or trained in diffusers. DiTFast against the reference (outputs, guidance, every gradient, the batched
inference paths), the state-dict layout, the cost model and step caching."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from dit_fast import cache as C
from dit_fast.checkpoints import (
    CheckpointError,
    from_diffusers_state_dict,
    read_checkpoint,
    save_official,
    to_diffusers_config,
    to_diffusers_state_dict,
    with_diffusers_conditioning,
)
from dit_fast.models.config import DiTConfig, param_count
from dit_fast.models.dit import DiTFast
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


# ---------------------------------------------------------------------------------------------------------------------
# the diffusers layout, both ways (diffusers itself is not needed here; parity with it: test_diffusers_pipeline.py)


def _distinct_diffusers_state_dict(depth: int = 3) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    """A diffusers-layout state dict whose per-block embedder copies all differ, and its shared-layout config."""
    torch.manual_seed(0)
    model = DiT(input_size=8, hidden_size=32, depth=depth, num_heads=2, num_classes=10, numerics="diffusers",
                per_block_conditioning=True)
    for p in model.parameters():
        p.data.normal_(0.0, 0.1)
    return to_diffusers_state_dict(model.state_dict(), model.config), model.config.replace(per_block_conditioning=False)


def test_diffusers_conversion_is_exact_both_ways(tmp_path):
    diffusers_sd, shared = _distinct_diffusers_state_dict()
    config = with_diffusers_conditioning(diffusers_sd, shared)
    assert config.per_block_conditioning
    ours, _ = from_diffusers_state_dict(diffusers_sd, config)
    assert torch.equal(ours["t_embedder.2.mlp.2.bias"],
                       diffusers_sd["transformer_blocks.2.norm1.emb.timestep_embedder.linear_2.bias"])
    back = to_diffusers_state_dict(ours, config)
    assert back.keys() == diffusers_sd.keys() and all(torch.equal(back[k], diffusers_sd[k]) for k in back)
    DiT.from_config(config).load_state_dict(ours, strict=True)
    with pytest.raises(CheckpointError, match="one shared timestep/label embedder"):
        save_official(ours, tmp_path / "x.pt", config=config)


def test_diffusers_folder_with_distinct_copies_reads_per_block(tmp_path):
    diffusers_sd, shared = _distinct_diffusers_state_dict()
    folder = tmp_path / "transformer"
    folder.mkdir()
    safetensors.torch.save_file(diffusers_sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_diffusers_config(shared)))
    ckpt = read_checkpoint(folder, numerics="diffusers")
    assert ckpt.config == shared.replace(per_block_conditioning=True)
    with pytest.warns(UserWarning, match="keeping block 0's copy"):
        lossy = read_checkpoint(folder, embedder_mismatch="warn")
    assert not lossy.config.per_block_conditioning
    with pytest.raises(CheckpointError, match="per-block embedder|differ from block 0's"):
        read_checkpoint(folder, embedder_mismatch="error")


def test_identical_copies_still_convert_to_the_shared_pair():
    model = DiT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    diffusers_sd = to_diffusers_state_dict(model.state_dict(), model.config)
    config = with_diffusers_conditioning(diffusers_sd, model.config)
    assert config == model.config
    ours, _ = from_diffusers_state_dict(diffusers_sd, config)
    assert ours.keys() == model.state_dict().keys()
