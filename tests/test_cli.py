"""The command line: files written, grids, clear errors and no partial files."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from nextstep.cli import main


@pytest.fixture(scope="module")
def dirs(fixtures_dir):
    d = fixtures_dir / "official-v1-a"
    return ["--model", str(d / "model"), "--vae", str(d / "vae")]


def test_generate_writes_one_png_per_image_and_a_grid(tmp_path, dirs, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "-o", str(out), "-n", "3", "--size", "48x32", "--steps", "2",
                 "--quiet", *dirs]) == 0
    for i in range(3):
        assert Image.open(tmp_path / f"img_{i}.png").size == (48, 32)
    assert Image.open(tmp_path / "img_grid.png").size == (2 * 48, 2 * 32)
    assert "img_grid.png" in capsys.readouterr().out


def test_generate_is_deterministic_for_a_seed(tmp_path, dirs):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        assert main(["generate", "x", "-o", str(p), "--size", "16x16", "--steps", "2", "--seed", "5", "--quiet",
                     *dirs]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_edit_uses_the_input_size(tmp_path, dirs, fixtures_dir):
    out = tmp_path / "e.png"
    src = fixtures_dir / "official-v1-a" / "edit_input.png"
    assert main(["edit", str(src), "make it blue", "-o", str(out), "--steps", "2", "--quiet", *dirs]) == 0
    assert Image.open(out).size == Image.open(src).size


def test_errors_leave_no_files(tmp_path, dirs, capsys):
    out = tmp_path / "bad.png"
    assert main(["generate", "x", "-o", str(out), "--size", "40x40", "--quiet", *dirs]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(out), "--steps", "0", "--quiet", *dirs]) == 2
    assert main(["generate", "x", "-o", str(out), "--model", str(tmp_path / "none")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "missing.png"), "x", "-o", str(out), *dirs]) == 2  # every usage error: 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "x", "-o", str(tmp_path / "x.jpg"), *dirs]) == 2
    assert ".png" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_without_a_model_the_message_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("nextstep.cli.bundled_model_dir", lambda: None)
    assert main(["generate", "x", "-o", str(tmp_path / "x.png")]) == 2
    assert "--model DIR" in capsys.readouterr().err


def test_generate_imports_no_training_code(tmp_path):
    """``nextstep generate`` stays light: no training loop, no torch.distributed.checkpoint (measured 37 such
    modules before they were cut, ~0.9 s of import time)."""
    import subprocess
    import sys

    out_png = tmp_path / "x.png"
    code = ("import sys; from nextstep.cli import main; "
            f"assert main(['generate', 'x', '--steps', '2', '--size', '16x16', '--quiet', '-o', "
            f"{str(out_png)!r}]) == 0; "
            "print(sorted(m for m in sys.modules if m.startswith("
            "('nextstep.train', 'torch.distributed.checkpoint', 'nextstep.serve', 'fastapi'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
    assert out_png.is_file()


def test_generate_says_which_settings_are_in_force(tmp_path, capsys, fixtures_dir):
    from nextstep.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "x", "--steps", "2", "--size", "16x16", "-o", str(out)]) == 0
    assert "sampler sde, 2 steps, guidance 3 (constant)" in capsys.readouterr().err  # the bundled model's defaults
    v11 = fixtures_dir / "official-v11-a"
    assert main(["generate", "x", "--model", str(v11 / "model"), "--vae", str(v11 / "vae"), "--size", "16x16",
                 "--steps", "2", "-o", str(out)]) == 0
    assert "sampler flow_sde (noise level 0.8), 2 steps, guidance 7.5 (constant)" in capsys.readouterr().err
    assert main(["generate", "x", "--noise-level", "2", "-o", str(out)]) == 2  # refused before loading
    assert "--noise-level must be a number in [0, 1]" in capsys.readouterr().err  # the CLI's flag name


@pytest.mark.parametrize("argv,match", [
    (["--device", "cuda:7"], "--device"),
    (["--device", "tpu"], "not a device name"),
    (["--seed", "-1"], "--seed"),
    (["-n", "0"], "-n must be"),
    (["-o", "out.jpg"], ".png"),
    (["--cfg", "500"], "--cfg must be"),
    (["--steps", "0"], "--steps must be"),
    (["--noise-level", "3"], "--noise-level must be"),
    (["--size", "4096x4096"], "smaller size"),
])
def test_usage_errors_exit_2_in_the_clis_words(argv, match, capsys, tmp_path):
    from nextstep.cli import main

    out = ["-o", str(tmp_path / "x.png")] if "-o" not in argv else []
    assert main(["generate", "a red circle", "--quiet", *out, *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_output_path_is_checked_before_generating(tmp_path, capsys, monkeypatch):
    from nextstep import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "taken.png").mkdir()
    assert cli.main(["generate", "x", "-o", str(tmp_path / "taken.png"), "--quiet"]) == 2
    assert "is a directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["generate", "x", "-o", str(blocker / "x.png"), "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_interrupt_prints_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from nextstep import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.NextStepPipeline, "__call__", interrupted)
    assert cli.main(["generate", "x", "-n", "2", "-o", str(tmp_path / "x.png"), "--quiet"]) == 130
    assert capsys.readouterr().err == "nextstep: interrupted (nothing written)\n"
    assert not any(tmp_path.iterdir())


def test_hub_ids_resolve_through_the_hub_cache_offline(tmp_path, fixtures_dir):
    """A hub id works from a hub cache laid out on disk, with HF_HUB_OFFLINE=1 (no network): the library and the CLI."""
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--acme--tiny-nextstep"
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(fixtures_dir / "official-v11-a" / "model", snap)
    shutil.copytree(fixtures_dir / "official-v11-a" / "vae", snap / "vae")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    code = ("import torch; from nextstep import NextStepPipeline; "
            "p = NextStepPipeline.from_pretrained('acme/tiny-nextstep', torch_dtype=torch.float32); "
            "print(p.format, p.defaults.sampler)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["v1.1", "flow_sde"], out.stderr
    png = tmp_path / "x.png"
    cli = [sys.executable, "-m", "nextstep.cli", "generate", "x", "--model", "acme/tiny-nextstep", "--size", "16x16",
           "--steps", "2", "--quiet", "-o", str(png)]
    assert subprocess.run(cli, env=env, capture_output=True, text=True).returncode == 0 and png.is_file()
    missing = subprocess.run(cli[:6] + ["acme/missing"] + cli[7:], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "neither a local directory nor available" in missing.stderr


def test_a_large_n_is_drawn_in_chunks_written_as_they_go(tmp_path, dirs, monkeypatch):
    """-n 100000 once grew to 23 GB in one pipeline call: now each call draws at most MAX_IMAGES_PER_CALL images and
    writes them before the next starts (beyond MAX_GRID_IMAGES, without a grid sheet)."""
    from nextstep import cli

    calls, real = [], cli.NextStepPipeline.__call__

    def spy(self, *a, **k):
        calls.append((k["num_images_per_prompt"], {p.name for p in tmp_path.iterdir()}))
        return real(self, *a, **k)

    monkeypatch.setattr(cli.NextStepPipeline, "__call__", spy)
    monkeypatch.setattr(cli, "MAX_GRID_IMAGES", 4)
    per_call = cli.MAX_IMAGES_PER_CALL
    n = 2 * per_call + 3
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "-n", str(n), "--size", "16x16", "--steps", "2",
                 "--quiet", *dirs]) == 0
    assert [c[0] for c in calls] == [per_call, per_call, 3]
    assert calls[1][1] == {f"x_{i}.png" for i in range(per_call)}  # the first chunk was on disk before the second
    assert {p.name for p in tmp_path.iterdir()} == {f"x_{i}.png" for i in range(n)}  # no grid of 19


def test_interrupt_keeps_the_chunks_written(tmp_path, dirs, capsys, monkeypatch):
    from nextstep import cli

    real, calls = cli.NextStepPipeline.__call__, []

    def second_interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(cli.NextStepPipeline, "__call__", second_interrupted)
    monkeypatch.setattr(cli, "MAX_GRID_IMAGES", 4)
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "-n", "20", "--size", "16x16", "--steps", "2",
                 "--quiet", *dirs]) == 130
    per_call = cli.MAX_IMAGES_PER_CALL
    assert capsys.readouterr().err == (f"nextstep: interrupted (the {per_call} images written are kept: "
                                       f"{tmp_path / 'x_0.png'} to {tmp_path / f'x_{per_call - 1}.png'})\n")
    assert len(list(tmp_path.iterdir())) == per_call


def test_a_write_the_machine_refuses_is_one_line_with_exit_1(tmp_path, dirs, capsys, monkeypatch):
    """A full disk: one line naming the file, exit 1 (the command was right), nothing left behind."""
    import errno

    def disk_full(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "-n", "2", "--size", "16x16", "--steps", "2",
                 "--quiet", *dirs]) == 1
    assert capsys.readouterr().err == (f"nextstep: error: cannot write {tmp_path / 'x_0.png'}: No space left on "
                                       f"device (nothing written of its 3 files)\n")
    assert not any(tmp_path.iterdir())


def test_an_unwritable_output_directory_is_found_before_loading(tmp_path, capsys, monkeypatch):
    """`-o /sys/x.png` as root: access() says yes, creating a file says no. A probe file finds it before loading."""
    import tempfile

    from nextstep import cli

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    assert cli.main(["generate", "x", "-o", str(tmp_path / "x.png"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"nextstep: error: -o {tmp_path / 'x.png'}: cannot write in {tmp_path} "
                                       f"(Permission denied)\n")
