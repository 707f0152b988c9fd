"""The train / sample / evaluate / extract-latents subcommands: --help and their error paths."""

from __future__ import annotations

import pytest

from dit_fast.cli import main as cli_main

COMMANDS = ["train", "sample", "evaluate", "extract-latents"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dit-fast {command}")


def test_official_flag_names(capsys):
    for command, flags in {
        "train": ["--results-dir", "--model", "--image-size", "--num-classes", "--global-batch-size", "--epochs",
                  "--ckpt-every", "--global-seed", "--vae", "--data-path", "--log-every", "--num-workers",
                  "--max-steps", "--lr", "--resume", "--dtype", "--compile", "--attention", "--kernels"],
        "sample": ["--ckpt", "--cfg-scale", "--num-sampling-steps", "--seed", "--model", "--image-size", "--vae",
                   "--npz", "--sampler", "--guide-channels", "--guidance-interval", "--dtype", "--compile"],
    }.items():
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        out = capsys.readouterr().out
        missing = [f for f in flags if f not in out]
        assert not missing, f"{command} lacks {missing}"


def test_extract_latents_errors(tmp_path, capsys):
    base = ["extract-latents", "--output", str(tmp_path / "out"), "--device", "cpu"]
    with pytest.raises(SystemExit, match="VAE folder .* does not exist|diffusers"):
        cli_main([*base, "--data-path", str(tmp_path), "--vae", str(tmp_path / "no-vae")])
    with pytest.raises(SystemExit):
        cli_main(["extract-latents", "--data-path", str(tmp_path)])
    assert "required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_choices_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli_main(["sample", "--ckpt", "x", "--sampler", "euler"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--model", "DiT-Q/3"])
    assert "invalid choice" in capsys.readouterr().err
