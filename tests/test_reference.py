"""The reference DiT against the official code's outputs, the paper's init, and its input checks."""

import json

import pytest
import torch
import torch.nn.functional as F

from dit_fast.reference import DiT, DiT_models, sincos_pos_embed_2d, timestep_embedding
from tests.helpers import FIXTURES, assert_close, load_official_fixture


def _fixture_model(name: str) -> tuple[DiT, dict[str, torch.Tensor]]:
    fx = load_official_fixture(name)
    cfg = json.loads((FIXTURES / "official_dit.json").read_text())["configs"][name]
    model = DiT(**cfg).eval()
    sd = {k[len("state_dict."):]: v for k, v in fx.items() if k.startswith("state_dict.")}
    model.load_state_dict(sd, strict=True)
    return model, fx


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_matches_official_forward(name):
    model, fx = _fixture_model(name)
    with torch.no_grad():
        out = model(fx["x"], fx["t"], fx["y"])
        cfg_out = model.forward_with_cfg(fx["cfg_x"], fx["cfg_t"], fx["cfg_y"], 4.0)
    assert_close(out, fx["forward"], atol=1e-5, rtol=1e-5, name=f"{name} forward")
    assert_close(cfg_out, fx["forward_with_cfg_4.0"], atol=2e-5, rtol=1e-5, name=f"{name} forward_with_cfg")


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_state_dict_keys_are_official(name):
    model, fx = _fixture_model(name)
    official = {k[len("state_dict."):]: v.shape for k, v in fx.items() if k.startswith("state_dict.")}
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == official


def test_init_follows_paper():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    _, fx = _fixture_model("tiny")
    # Fixed positions are bitwise the official table.
    assert torch.equal(model.pos_embed, fx["state_dict.pos_embed"])
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
        bound = (6 / (64 + 192)) ** 0.5  # Xavier-uniform fan_in + fan_out for qkv
        w = block.attn.qkv.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound and not block.attn.qkv.bias.any()
    assert not model.final_layer.linear.weight.any() and not model.final_layer.adaLN_modulation[-1].weight.any()
    assert model.y_embedder.embedding_table.weight.shape == (11, 64)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.004
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    # Zero-initialised output: the untrained model predicts zeros.
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.tensor([3, 10]))
    assert out.shape == (2, 8, 8, 8) and not out.any()


def test_timestep_embedding_numerics():
    t = torch.tensor([0.0, 1.0, 999.0, 12.5])
    emb = timestep_embedding(t, 256)
    i = torch.arange(128, dtype=torch.float64)
    args = t.double()[:, None] * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / 128)
    assert_close(emb, torch.cat([args.cos(), args.sin()], 1), atol=1e-4, rtol=0)
    shifted = timestep_embedding(t, 256, freq_shift=1)  # diffusers divides by 127
    args127 = t.double()[:, None] * torch.exp(-torch.log(torch.tensor(10000.0, dtype=torch.float64)) * i / 127)
    assert_close(shifted, torch.cat([args127.cos(), args127.sin()], 1), atol=1e-4, rtol=0)
    assert timestep_embedding(t, 7).shape == (4, 7)


def test_non_square_input_and_positions():
    torch.manual_seed(0)
    model = DiT(input_size=(8, 12), patch_size=2, hidden_size=64, depth=1, num_heads=2, num_classes=5)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(3, 4, 8, 12)
    out = model(x, torch.tensor([3, 40, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 8, 8, 12)
    # The non-square table equals the square one restricted to its rows/columns (first half: column code).
    square = sincos_pos_embed_2d(64, (6, 6)).reshape(6, 6, 64)
    rect = sincos_pos_embed_2d(64, (4, 6)).reshape(4, 6, 64)
    assert torch.equal(rect, square[:4])
    # unpatchify inverts a patchify of the tokens in (p, p, c) order.
    tokens = F.unfold(out, 2, stride=2).transpose(1, 2)  # (N, T, c*p*p) in (c, p, p) order
    tokens = tokens.reshape(3, 24, 8, 2, 2).permute(0, 1, 3, 4, 2).reshape(3, 24, 32)  # -> (p, p, c)
    assert torch.equal(model.unpatchify(tokens), out)


def _random_model(**kw) -> DiT:
    torch.manual_seed(0)
    model = DiT(**{"input_size": 8, "patch_size": 2, "hidden_size": 64, "depth": 1, "num_heads": 2,
                   "num_classes": 10, **kw}).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def test_forward_with_cfg_channels():
    model = _random_model()
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 20, 10, 20])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = model(torch.cat([x[:2], x[:2]]), t, y)
        cond, uncond = raw[:2], raw[2:]
        three = model.forward_with_cfg(x, t, y, 2.5)
        every = model.forward_with_cfg(x, t, y, 2.5, guide_channels="all")
    guided = uncond + 2.5 * (cond - uncond)
    assert_close(three[:2, :3], guided[:, :3], name="guided eps")
    assert torch.equal(three[:2, 3:], cond[:, 3:])  # 4th eps channel and variance: unguided
    assert torch.equal(three[2:, :3], three[:2, :3])  # both halves carry the guided eps
    assert torch.equal(three[2:, 3:], uncond[:, 3:])
    assert_close(every[:2, :4], guided[:, :4], name="all-channel eps")
    assert torch.equal(every[:2, 4:], cond[:, 4:])  # learned variance is never guided
    with pytest.raises(ValueError, match="even batch"):
        model.forward_with_cfg(x[:3], t[:3], y[:3], 2.0)
    with pytest.raises(ValueError, match="guide_channels"):
        model.forward_with_cfg(x, t, y, 2.0, guide_channels=0)


def test_cfg_guides_only_eps_for_single_channel_models():
    model = _random_model(in_channels=1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = model.forward_with_cfg(x, torch.tensor([5, 5]), torch.tensor([3, 10]), 3.0)
        raw = model(torch.cat([x[:1], x[:1]]), torch.tensor([5, 5]), torch.tensor([3, 10]))
    assert_close(out[0, :1], raw[1, :1] + 3.0 * (raw[0, :1] - raw[1, :1]), name="eps channel")
    assert torch.equal(out[0, 1:], raw[0, 1:])


def test_label_dropout_only_in_training():
    model = _random_model(class_dropout_prob=0.5)
    y = torch.arange(10).repeat(20)
    model.train()
    dropped = model.y_embedder.token_drop(y)
    assert 0 < (dropped == 10).sum() < len(y)
    model.eval()
    torch.manual_seed(1)
    assert torch.equal(model.y_embedder(y, train=False), model.y_embedder.embedding_table(y))
    no_null = _random_model(class_dropout_prob=0.0)
    assert no_null.y_embedder.embedding_table.num_embeddings == 10


@pytest.mark.parametrize(
    "x_shape, t, y, match",
    [
        ((4, 8, 8), [1], [1], "4D tensor"),
        ((1, 3, 8, 8), [1], [1], "3 channels"),
        ((1, 4, 9, 8), [1], [1], "not a multiple of patch size"),
        ((1, 4, 16, 16), [1], [1], "built for input_size"),
        ((2, 4, 8, 8), [1], [1, 2], r"t must have shape \(2,\)"),
        ((2, 4, 8, 8), [1, 2], [1], r"y must have shape \(2,\)"),
        ((2, 4, 8, 8), [1, 2], [1, 11], r"labels must be in \[0, 10\]"),
        ((2, 4, 8, 8), [1, 2], [-1, 1], r"labels must be in \[0, 10\]"),
    ],
)
def test_bad_inputs(x_shape, t, y, match):
    model = _random_model()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*x_shape), torch.tensor(t), torch.tensor(y))


def test_bad_dtypes():
    model = _random_model()
    with pytest.raises(TypeError, match="integer class labels"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 4, 8, 8, dtype=torch.int64), torch.tensor([1]), torch.tensor([1]))


def test_model_constructors():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    with torch.device("meta"):
        m = DiT_models["DiT-S/4"](input_size=16, num_classes=10)
    assert (m.config.depth, m.config.hidden_size, m.config.patch_size, m.config.num_heads) == (12, 384, 4, 6)
    assert m.pos_embed.shape == (1, 16, 384)


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    model = _random_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 2])
    model(x, t, y).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    calls: list[int] = []
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda *_: calls.append(1))  # the block's first op
    model.gradient_checkpointing = True
    model(x, t, y).square().sum().backward()
    assert len(calls) == 2  # forward, and again in the backward
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-6, name=f"checkpointed grad {name}")
