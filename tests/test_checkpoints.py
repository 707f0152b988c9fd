"""Checkpoint reading, inference, the dit-fast format, the diffusers key mapping and every bad input (no diffusers)."""

import argparse
import json
import pathlib

import pytest
import safetensors.torch
import torch

from dit_fast import cli
from dit_fast.checkpoints import (
    CheckpointError,
    expected_shapes,
    from_diffusers_state_dict,
    infer_config,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_diffusers,
    save_official,
    to_diffusers_config,
    to_diffusers_state_dict,
)
from dit_fast.models.config import CONFIGS, DiTConfig
from dit_fast.reference import DiT
from tests.helpers import FIXTURES, assert_close, load_official_fixture

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=10)


def _official(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(official state dict, fixture tensors, fixture config) for the fixture config ``name``."""
    fx = load_official_fixture(name)
    cfg = json.loads((FIXTURES / "official_dit.json").read_text())["configs"][name]
    sd = {k[len("state_dict."):]: v for k, v in fx.items() if k.startswith("state_dict.")}
    return sd, fx, cfg


def _random_model(seed: int = 0, **overrides) -> DiT:
    """A tiny DiT with EVERY parameter random (not the zero adaLN init), so outputs depend on all weights."""
    torch.manual_seed(seed)
    model = DiT(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def _inputs(config: DiTConfig, n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = config.grid_input
    x = torch.randn(n, config.in_channels, h, w, generator=g)  # (N, C, H, W)
    t = torch.tensor([0, 17, 500, 999][:n])  # (N,)
    y = torch.tensor([3, 0, config.num_classes, 9][:n])  # (N,), the null class included
    return x, t, y


def _forward(model: torch.nn.Module, config: DiTConfig) -> torch.Tensor:
    with torch.no_grad():
        return model(*_inputs(config))


def _meta_state_dict(config: DiTConfig) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in expected_shapes(config).items()}


# ---------------------------------------------------------------------------------------------------------------
# Official and train.py checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_official_bare_state_dict(tmp_path, name):
    sd, fx, cfg = _official(name)
    torch.save(sd, tmp_path / "DiT.pt")
    result = load_checkpoint(tmp_path / "DiT.pt", num_heads=cfg["num_heads"])
    assert result.format == "official" and result.numerics == "official"
    assert result.config == DiTConfig(**cfg)
    assert not result.model.training
    with torch.no_grad():
        out = result.model(fx["x"], fx["t"], fx["y"])
    assert_close(out, fx["forward"], atol=1e-5, rtol=1e-5, name=f"{name} forward")


@pytest.mark.parametrize("name", ["tiny", "odd"])
def test_train_py_checkpoint_takes_ema_by_default(tmp_path, name):
    sd, fx, cfg = _official(name)
    model = DiT(**cfg)
    model.load_state_dict(sd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(fx["x"], fx["t"], fx["y"]).square().mean().backward()
    optimizer.step()  # "model" now differs from "ema"; "opt" holds real AdamW state
    args = argparse.Namespace(model="DiT-tiny", image_size=cfg["input_size"] * 8, num_classes=10, epochs=1400,
                              global_batch_size=256, vae="ema", data_path="/data/imagenet/train")
    torch.save({"model": model.state_dict(), "ema": sd, "opt": optimizer.state_dict(), "args": args},
               tmp_path / "0400000.pt")

    ema = load_checkpoint(tmp_path / "0400000.pt", num_heads=cfg["num_heads"])
    assert ema.format == "train.py" and ema.config == DiTConfig(**cfg)
    assert any("'ema'" in n for n in ema.notes) and any("not a zoo config" in n for n in ema.notes)
    with torch.no_grad():
        assert_close(ema.model(fx["x"], fx["t"], fx["y"]), fx["forward"], atol=1e-5, rtol=1e-5, name="ema forward")

    raw = load_checkpoint(tmp_path / "0400000.pt", num_heads=cfg["num_heads"], use_model_weights=True)
    for k, v in model.state_dict().items():
        assert torch.equal(raw.model.state_dict()[k], v), k
    assert not torch.equal(raw.model.blocks[0].attn.qkv.weight, ema.model.blocks[0].attn.qkv.weight)


def test_train_py_args_model_name_gives_heads(tmp_path):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=8, hidden_size=384, depth=12, num_heads=6, num_classes=10).eval()
    args = argparse.Namespace(model="DiT-S/8", image_size=64, num_classes=10)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args}, tmp_path / "ckpt.pt")
    result = load_checkpoint(tmp_path / "ckpt.pt")
    assert result.config == model.config
    assert any("args.model" in n for n in result.notes)
    assert torch.equal(_forward(result.model, model.config), _forward(model, model.config))


def test_train_py_checkpoint_with_a_config_entry(tmp_path):
    model = _random_model(numerics="diffusers", input_size=(8, 12))
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "config": model.config.to_dict(),
                "args": argparse.Namespace(model="DiT-S/2", image_size=64)}, tmp_path / "ckpt.pt")
    result = load_checkpoint(tmp_path / "ckpt.pt")  # the stored config wins over args and needs no hints
    assert result.config == model.config and result.numerics == "diffusers"
    assert torch.equal(_forward(result.model, model.config), _forward(model, model.config))
    with pytest.raises(CheckpointError, match="overrides conflict with it: input_size=8 but the checkpoint has"):
        read_checkpoint(tmp_path / "ckpt.pt", input_size=8)


def test_random_init_model_through_official_format(tmp_path):
    model = _random_model()
    save_official(model, tmp_path / "w.pt")
    assert set(torch.load(tmp_path / "w.pt", weights_only=True)) == set(model.state_dict())
    result = load_checkpoint(tmp_path / "w.pt", num_heads=2)
    assert result.config == model.config
    assert torch.equal(_forward(result.model, model.config), _forward(model, model.config))


def test_bare_safetensors_state_dict_and_prefixes(tmp_path):
    model = _random_model()
    safetensors.torch.save_file({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    result = load_checkpoint(tmp_path / "w.safetensors", num_heads=2)
    assert result.format == "safetensors" and any("'module.'" in n for n in result.notes)
    assert torch.equal(_forward(result.model, model.config), _forward(model, model.config))


@pytest.mark.parametrize("name, input_size", [("DiT-XL/2", 32), ("DiT-XL/2", 64), ("DiT-B/4", 32), ("DiT-S/8", 16)])
def test_infer_config_matches_zoo(name, input_size):
    config = CONFIGS[name].replace(input_size=input_size)
    inferred, notes = infer_config(_meta_state_dict(config))
    assert inferred == config  # 1001 label rows -> 1000 classes + null, dropout 0.1
    assert any(name in n for n in notes)


def test_infer_config_label_rows_and_overrides():
    sd = _meta_state_dict(DiTConfig(**TINY))  # 11 label rows
    assert infer_config(sd, num_heads=2)[0].num_classes == 10
    no_null, _ = infer_config(sd, num_heads=2, num_classes=11)
    assert (no_null.num_classes, no_null.class_dropout_prob) == (11, 0.0)
    zero, _ = infer_config(sd, num_heads=2, class_dropout_prob=0.0)
    assert (zero.num_classes, zero.class_dropout_prob) == (11, 0.0)
    custom, _ = infer_config(sd, num_heads=2, class_dropout_prob=0.25)
    assert (custom.num_classes, custom.class_dropout_prob) == (10, 0.25)
    with pytest.raises(CheckpointError, match="11 rows, which fits neither num_classes=5"):
        infer_config(sd, num_heads=2, num_classes=5)
    with pytest.raises(CheckpointError, match="cannot infer num_heads.*--num-heads"):
        infer_config(sd)
    with pytest.raises(CheckpointError, match="means depth 28, hidden 1152, patch 2"):
        infer_config(sd, model_name="DiT-XL/2")


def test_infer_config_non_square_needs_input_size():
    config = DiTConfig(**{**TINY, "input_size": (8, 12)})
    sd = _meta_state_dict(config)
    with pytest.raises(CheckpointError, match="24 tokens, not a square grid: pass input_size"):
        infer_config(sd, num_heads=2)
    assert infer_config(sd, num_heads=2, input_size=(8, 12))[0] == config
    with pytest.raises(CheckpointError, match="gives 16 tokens, but pos_embed has 24"):
        infer_config(sd, num_heads=2, input_size=8)


def test_model_cls_class_or_builder(tmp_path):
    class Subclass(DiT):
        pass

    model = _random_model()
    save_official(model, tmp_path / "w.pt")
    as_class = load_checkpoint(tmp_path / "w.pt", num_heads=2, model_cls=Subclass, numerics="diffusers")
    assert type(as_class.model) is Subclass and as_class.model.config.numerics == "diffusers"
    class WithNonPersistentBuffer(DiT):  # state outside the state dict: built for real, not on the meta device
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_buffer("scale", torch.full((1,), 2.0), persistent=False)

    non_persistent = load_checkpoint(tmp_path / "w.pt", num_heads=2, model_cls=WithNonPersistentBuffer)
    assert non_persistent.model.scale.item() == 2.0
    assert torch.equal(_forward(non_persistent.model, model.config), _forward(model, model.config))
    built = []
    builder = lambda c: built.append(c) or DiT.from_config(c)
    as_builder = load_checkpoint(tmp_path / "w.pt", num_heads=2, model_cls=builder, dtype=torch.float64)
    assert built == [model.config] and as_builder.model.pos_embed.dtype == torch.float64
    assert all(p.requires_grad for p in as_builder.model.parameters())


def test_loads_into_dit_fast(tmp_path):
    from dit_fast.models.dit import DiTFast

    sd, fx, cfg = _official("odd")
    torch.save(sd, tmp_path / "DiT.pt")
    result = load_checkpoint(tmp_path / "DiT.pt", num_heads=2, model_cls=DiTFast)
    assert type(result.model) is DiTFast
    with torch.no_grad():
        out = result.model(fx["x"], fx["t"], fx["y"])
    assert_close(out, fx["forward"], atol=1e-5, rtol=1e-5, name="DiTFast forward")


# ---------------------------------------------------------------------------------------------------------------
# The dit-fast format
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "file.safetensors"])
def test_dit_fast_round_trip(tmp_path, layout):
    model = _random_model(numerics="diffusers", input_size=(8, 12)).to(torch.bfloat16)
    path = save_checkpoint(model, tmp_path / layout)
    if layout == "folder":
        meta = json.loads((path / "config.json").read_text())
        assert meta["format"] == "dit-fast" and meta["format_version"] == 1 and meta["dtype"] == "bfloat16"
        assert DiTConfig.from_dict(meta["config"]) == model.config
    ckpt = read_checkpoint(path)
    assert ckpt.format == "dit-fast" and ckpt.config == model.config and ckpt.numerics == "diffusers"
    assert ckpt.state_dict.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert ckpt.state_dict[k].dtype == v.dtype and torch.equal(ckpt.state_dict[k], v), k
    assert read_checkpoint(path, numerics="official").numerics == "official"
    loaded = load_checkpoint(path).model  # the model keeps its own dtype (fp32), like a copying load_state_dict
    assert loaded.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.float())
    assert not list(tmp_path.rglob("*.tmp"))


def test_dit_fast_overrides_must_agree(tmp_path):
    path = save_checkpoint(_random_model(), tmp_path / "m")
    with pytest.raises(CheckpointError, match="num_heads=4 but the checkpoint has 2"):
        read_checkpoint(path, num_heads=4)


def _failing_write(obj, target, *args, **kwargs):
    """Stands in for torch.save / safetensors' save_file: writes part of the file, then fails."""
    with open(target, "wb") as f:
        f.write(b"partial")
    raise OSError("No space left on device")


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_atomic_write_never_leaves_a_partial_file(tmp_path, monkeypatch, writer):
    model, other = _random_model(0), _random_model(1)
    if writer == "safetensors":
        target, save, patched = tmp_path / "m.safetensors", save_checkpoint, (safetensors.torch, "save_file")
    else:
        target, save, patched = tmp_path / "m.pt", save_official, (torch, "save")
    save(model, target)
    before = target.read_bytes()
    monkeypatch.setattr(*patched, _failing_write)
    with pytest.raises(OSError, match="No space left"):
        save(other, target)  # overwriting: the old file stays intact
    with pytest.raises(OSError, match="No space left"):
        save(other, tmp_path / f"fresh{target.suffix}")  # a new file: nothing appears
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_interrupted_folder_save_is_detected(tmp_path, monkeypatch):
    save_checkpoint(_random_model(), tmp_path / "m")
    def killed(self, *args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(pathlib.Path, "write_text", killed)
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(_random_model(num_classes=7), tmp_path / "m")  # new weights written, config.json not
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="disagree \\(an interrupted save\\?\\)"):
        read_checkpoint(tmp_path / "m")


# ---------------------------------------------------------------------------------------------------------------
# diffusers layout (pure mapping; parity with diffusers itself is in test_diffusers_interop.py)
# ---------------------------------------------------------------------------------------------------------------


def test_diffusers_mapping_round_trip_is_bitwise():
    model = _random_model()
    sd = model.state_dict()
    diffusers_sd = to_diffusers_state_dict(sd, model.config)
    assert "pos_embed" not in diffusers_sd
    assert torch.equal(diffusers_sd["transformer_blocks.1.attn1.to_k.weight"], sd["blocks.1.attn.qkv.weight"][64:128])
    assert torch.equal(diffusers_sd["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"],
                       sd["y_embedder.embedding_table.weight"])
    back, notes = from_diffusers_state_dict(diffusers_sd, model.config)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert any("pos_embed regenerated" in n for n in notes)


def test_diffusers_folder_and_pipeline_folder(tmp_path):
    model = _random_model()
    save_diffusers(model, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    config_json = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert config_json == {**to_diffusers_config(model.config)}
    heads_dim_out = (config_json["num_attention_heads"], config_json["attention_head_dim"], config_json["out_channels"])
    assert heads_dim_out == (2, 32, 8)
    for path in (tmp_path / "pipe", tmp_path / "pipe" / "transformer",
                 tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"):
        result = load_checkpoint(path)
        assert result.format == "diffusers" and result.numerics == "official"
        assert result.config == model.config
        assert torch.equal(_forward(result.model, model.config), _forward(model, model.config))
    assert load_checkpoint(tmp_path / "pipe", numerics="diffusers").numerics == "diffusers"


def test_diffusers_embedder_copies_must_agree():
    model = _random_model(depth=4)
    diffusers_sd = to_diffusers_state_dict(model.state_dict(), model.config)
    for block in (1, 3):
        diffusers_sd[f"transformer_blocks.{block}.norm1.emb.timestep_embedder.linear_2.bias"] += 0.5
    with pytest.raises(CheckpointError, match=r"differ from block 0's in block 1 \(max \|diff\| 0.5\), block 3"):
        from_diffusers_state_dict(diffusers_sd, model.config)
    with pytest.warns(UserWarning, match="keeping block 0's copy"):
        back, notes = from_diffusers_state_dict(diffusers_sd, model.config, embedder_mismatch="warn")
    assert torch.equal(back["t_embedder.mlp.2.bias"], model.state_dict()["t_embedder.mlp.2.bias"])
    assert any("blocks [1, 3]" in n for n in notes)


def test_diffusers_cannot_express_some_configs(tmp_path):
    with pytest.raises(CheckpointError, match="not square.*mlp_ratio 2.0 is not 4.*no null row"):
        to_diffusers_config(DiTConfig(**{**TINY, "input_size": (8, 12), "mlp_ratio": 2.0, "class_dropout_prob": 0.0}))


def test_diffusers_missing_and_extra_keys_listed():
    model = _random_model()
    diffusers_sd = to_diffusers_state_dict(model.state_dict(), model.config)
    del diffusers_sd["transformer_blocks.0.attn1.to_v.bias"], diffusers_sd["proj_out_2.weight"]
    diffusers_sd["transformer_blocks.0.norm2.weight"] = torch.zeros(64)
    with pytest.raises(CheckpointError) as e:
        from_diffusers_state_dict(diffusers_sd, model.config)
    message = str(e.value)
    for key in ("2 missing keys", "transformer_blocks.0.attn1.to_v.bias", "proj_out_2.weight",
                "1 unexpected keys", "transformer_blocks.0.norm2.weight"):
        assert key in message


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_all_listed(tmp_path):
    sd = dict(_random_model().state_dict())
    del sd["blocks.1.mlp.fc2.bias"], sd["final_layer.linear.bias"]
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(32)
    sd["extra.thing"] = torch.ones(1)
    sd["blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    sd["blocks.0.mlp.fc2.bias"] = torch.zeros(65)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(tmp_path / "bad.pt", num_heads=2)
    message = str(e.value)
    for expected in ("2 missing keys", "blocks.1.mlp.fc2.bias", "final_layer.linear.bias",
                     "2 unexpected keys", "blocks.0.attn.q_norm.weight", "extra.thing",
                     "2 mis-shaped keys", "blocks.1.attn.proj.weight: got (64, 32), expected (64, 64)",
                     "blocks.0.mlp.fc2.bias: got (65,), expected (64,)"):
        assert expected in message, expected


def test_not_a_dit_state_dict(tmp_path):
    torch.save({"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="not a DiT state dict.*missing.*x_embedder.proj.weight.*conv1.weight"):
        read_checkpoint(tmp_path / "resnet.pt")
    model = _random_model()
    torch.save(to_diffusers_state_dict(model.state_dict(), model.config), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="diffusers keys: pass the diffusers folder"):
        read_checkpoint(tmp_path / "diffusion_pytorch_model.bin", num_heads=2)
    torch.save({"step": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a DiT state dict.*nor a train.py.*'step', 'weights'"):
        read_checkpoint(tmp_path / "other.pt")


def test_truncated_and_non_checkpoint_files(tmp_path):
    model = _random_model()
    save_official(model, tmp_path / "w.pt")
    save_checkpoint(model, tmp_path / "w.safetensors")
    for name in ("w.pt", "w.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_checkpoint(tmp_path / f"cut_{name}", num_heads=2)
    (tmp_path / "notes.txt").write_text("hello, these are my notes about DiT\n")
    with pytest.raises(CheckpointError, match="not a checkpoint: neither a PyTorch file"):
        read_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")


class Untrusted:
    """A class that weights_only unpickling must refuse."""


def test_pickle_with_untrusted_global_is_refused(tmp_path):
    sd = _random_model().state_dict()
    torch.save({"ema": sd, "model": sd, "args": Untrusted()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError,
                       match=r"holds code objects \(tests.test_checkpoints.Untrusted\) that dit-fast will not load"):
        read_checkpoint(tmp_path / "evil.pt", num_heads=2)


def test_unknown_config_name_lists_valid_names(tmp_path):
    save_official(_random_model(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="unknown model config 'DiT-XXL/2'; valid names: DiT-S/2.*DiT-XL/8"):
        read_checkpoint(tmp_path / "w.pt", model_name="DiT-XXL/2")


def test_missing_path_says_where_to_get_weights(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_checkpoint(tmp_path / "DiT-XL-2-256x256.pt")
    message = str(e.value)
    assert "DiT-XL-2-256x256.pt" in message and "never downloads" in message
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt" in message
    assert "facebook/DiT-XL-2-256" in message and "sd-vae-ft-ema" in message


def test_diffusers_config_of_another_model(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3}))
    with pytest.raises(CheckpointError, match="describes a diffusers UNet2DModel, not a DiT"):
        read_checkpoint(tmp_path / "unet")
    (tmp_path / "t2d").mkdir()
    (tmp_path / "t2d" / "config.json").write_text(json.dumps(
        {**to_diffusers_config(DiTConfig(**TINY)), "_class_name": "Transformer2DModel", "norm_type": "layer_norm",
         "cross_attention_dim": 768}))
    with pytest.raises(CheckpointError, match="Transformer2DModel but not a DiT: norm_type='layer_norm'.*"
                                              "cross_attention_dim=768"):
        read_checkpoint(tmp_path / "t2d")


def test_train_py_without_the_requested_weights(tmp_path):
    torch.save({"model": _random_model().state_dict(), "opt": {}}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="has no 'ema' entry.*use_model_weights=True"):
        read_checkpoint(tmp_path / "c.pt", num_heads=2)
    assert read_checkpoint(tmp_path / "c.pt", num_heads=2, use_model_weights=True).format == "train.py"


def test_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint folder.*x.txt"):
        read_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# dit-fast convert
# ---------------------------------------------------------------------------------------------------------------


def test_cli_convert_chain(tmp_path, capsys):
    sd, fx, cfg = _official("tiny")
    torch.save(sd, tmp_path / "official.pt")
    assert cli.main(["convert", str(tmp_path / "official.pt"), str(tmp_path / "df"), "--to", "diffusers",
                     "--num-heads", "2"]) == 0
    assert cli.main(["convert", str(tmp_path / "df"), str(tmp_path / "ours"), "--to", "dit-fast",
                     "--numerics", "diffusers"]) == 0
    out = capsys.readouterr().out
    assert "format: diffusers" in out and "numerics: diffusers" in out and "wrote" in out
    assert read_checkpoint(tmp_path / "ours").numerics == "diffusers"
    assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pt"), "--to", "official"]) == 0
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back.pt"), "--to", "official"])
    with pytest.raises(SystemExit, match="cannot infer num_heads"):
        cli.main(["convert", str(tmp_path / "official.pt"), str(tmp_path / "x"), "--to", "dit-fast"])


@pytest.mark.parametrize(("to", "name"), [("dit-fast", "ours.safetensors"), ("official", "ours.pt"),
                                          ("dit-fast", "folder")])
def test_cli_convert_to_bf16_loads_without_a_cast(tmp_path, to, name):
    """--dtype bf16 writes every weight in bf16 (half the bytes); loading it in bf16 gives the same model as
    casting the fp32 weights at load, and in fp32 the bf16 values widened."""
    sd, _, cfg = _official("tiny")
    torch.save(sd, tmp_path / "official.pt")
    assert cli.main(["convert", str(tmp_path / "official.pt"), str(tmp_path / name), "--to", to, "--num-heads", "2",
                     "--dtype", "bf16"]) == 0
    stored = read_checkpoint(tmp_path / name, num_heads=2)
    assert all(v.dtype == torch.bfloat16 for v in stored.state_dict.values() if v.is_floating_point())
    from_bf16 = load_checkpoint(tmp_path / name, num_heads=2, dtype=torch.bfloat16).model.state_dict()
    from_fp32 = load_checkpoint(tmp_path / "official.pt", num_heads=2, dtype=torch.bfloat16).model.state_dict()
    assert from_bf16.keys() == from_fp32.keys() and all(torch.equal(from_bf16[k], from_fp32[k]) for k in from_fp32)
    widened = load_checkpoint(tmp_path / name, num_heads=2).model.state_dict()
    assert all(torch.equal(widened[k], from_fp32[k].float()) for k in from_fp32 if from_fp32[k].is_floating_point())
