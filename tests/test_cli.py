"""The command line: files written, grids, clear errors and no partial files."""

from __future__ import annotations

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
    with pytest.raises(SystemExit, match="not found"):
        main(["edit", str(tmp_path / "missing.png"), "x", "-o", str(out), *dirs])
    with pytest.raises(SystemExit, match=".png"):
        main(["generate", "x", "-o", str(tmp_path / "x.jpg"), *dirs])
    assert list(tmp_path.iterdir()) == []


def test_without_a_model_the_message_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr("nextstep.cli.bundled_model_dir", lambda: None)
    with pytest.raises(SystemExit, match="--model DIR"):
        main(["generate", "x", "-o", str(tmp_path / "x.png")])


def test_generate_imports_no_training_code(tmp_path):
    """``nextstep generate`` stays light: no training loop, no torch.distributed.checkpoint (measured 37 such
    modules before they were cut, ~0.9 s of import time)."""
    import subprocess
    import sys

    out_png = tmp_path / "x.png"
    code = ("import sys; from nextstep.cli import main; "
            f"assert main(['generate', 'x', '--steps', '2', '--size', '16x16', '--quiet', '-o', {str(out_png)!r}]) == 0; "
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
    assert "noise_level must be a number in [0, 1]" in capsys.readouterr().err
