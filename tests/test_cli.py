"""The `dit-fast` subcommands: --help, their error paths, and `--debug` tracebacks for every command."""

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
        cli_main([*base, "--data-path", str(tmp_path / "images"), "--vae", str(tmp_path / "no-vae")])
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


# One real user error per command, each raised before any model is built: (arguments, what the message says).
USER_ERRORS = {
    "info": (["--image-size", "12"], "not a multiple of 8"),
    "train": (["--eval", "--data-path", "{tmp}"], "--eval scores the built-in digits only"),
    "sample": (["--ckpt", "x.pt", "--guidance-interval", "5", "1", "--out", "{tmp}/s.png"], "LO must be <= HI"),
    "evaluate": ([], "give a samples .npz"),
    "extract-latents": (["--data-path", "{tmp}/images", "--vae", "{tmp}/no-vae", "--output", "{tmp}/out", "--device",
                         "cpu"],
                        "VAE folder .* does not exist|diffusers"),
    "convert": (["{tmp}/missing.pt", "{tmp}/out.pt", "--to", "official"], "checkpoint not found"),
    "env": ([], "no report here"),  # env has no bad input of its own: its report is made to fail below
}


def test_every_command_has_a_debug_case():
    from dit_fast.cli import COMMANDS

    assert set(USER_ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(USER_ERRORS))
def test_debug_shows_the_traceback_of_every_command(command, tmp_path, monkeypatch):
    """A user error is one line (``dit-fast COMMAND: message``); with ``--debug`` the library's exception itself
    propagates, so no command converts its errors on its own."""
    if command == "env":
        import dit_fast.commands.env

        def failing_report(device_type, head_dim):
            raise OSError("no report here")

        monkeypatch.setattr(dit_fast.commands.env, "report", failing_report)
    args, message = USER_ERRORS[command]
    argv = [command, *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith(f"dit-fast {command}: ")
    assert "\n" not in e.value.code.split(": ", 1)[1].split("\n")[0]
    with pytest.raises((ValueError, OSError, ImportError), match=message):
        cli_main(["--debug", *argv])
