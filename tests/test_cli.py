"""The command line: files written, grids, clear errors and no partial files."""

from __future__ import annotations

import json
import os
import platform
import sys

import pytest
from PIL import Image

from nextstep.cli import MALLOC_SETTINGS, keep_freed_memory, main


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


FAULTS = r"""
import json, resource, torch
from nextstep.cli import keep_freed_memory, main
assert main(["info"]) == 0  # any command
faults = []
for _ in range(3):  # a 64 MiB intermediate, made and freed as a decode's largest activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20).sum()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([keep_freed_memory()] + faults))  # whether glibc takes the settings (as main asked before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_commands_keep_freed_memory_in_their_process(monkeypatch):
    """glibc maps every allocation over 32 MiB afresh (smaller ones too until large blocks have been freed) and hands
    freed memory back: each such intermediate is page-faulted in at every call (16K pages for 64 MiB). A command
    keeps freed memory in its process (``keep_freed_memory``, called by ``main``): after the first time, none."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
    env.pop("GLIBC_TUNABLES", None)
    kept = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True, env=env)
    took, *faults = json.loads(kept.stdout.strip().splitlines()[-1])
    assert took
    if faults[0] < 10_000:
        pytest.skip("transparent huge pages for every mapping: page faults do not count 4 KiB pages here")
    assert max(faults[1:]) < 1_000, faults  # glibc's default: 16K at every time
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")  # the user's own settings win
    assert not keep_freed_memory()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")  # other tunables are not about the allocator
    assert keep_freed_memory()


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
    png = tmp_path / "x.png"
    cli = ["generate", "x", "--model", "acme/tiny-nextstep", "--size", "16x16", "--steps", "2", "--quiet",
           "-o", str(png)]
    missing = cli[:3] + ["acme/missing"] + cli[4:]
    # one process (the hub library reads HF_HUB_OFFLINE when imported): the library, then the CLI twice
    code = ("import sys, torch; from nextstep import NextStepPipeline; from nextstep.cli import main; "
            "p = NextStepPipeline.from_pretrained('acme/tiny-nextstep', torch_dtype=torch.float32); "
            "print(p.format, p.defaults.sampler); "
            f"print('generate', main({cli!r})); sys.stdout.flush(); print('missing', main({missing!r}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()  # (generate prints the file it wrote)
    assert words[:2] == ["v1.1", "flow_sde"] and words[-4:] == ["generate", "0", "missing", "2"], out.stdout
    assert png.is_file() and "neither a local directory nor available" in out.stderr


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


# ---- the rough edges a new user hit ----------------------------------------------------------------------------

def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_bad_port_before_loading(port, monkeypatch, capsys):
    from helpers import need

    need("fastapi", "pip install -e '.[serve]'")
    from nextstep.serve import runner

    monkeypatch.setattr(runner.NextStepPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["serve", "--port", port]) == 2
    assert one_line(capsys.readouterr().err) == f"nextstep: error: --port must be from 0 to 65535 (0: a free port), " \
                                                f"got {port}\n"


def test_serve_finds_a_port_in_use_before_loading(monkeypatch, capsys):
    import socket

    from helpers import need

    need("fastapi", "pip install -e '.[serve]'")
    from nextstep.serve import runner

    monkeypatch.setattr(runner.NextStepPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in err and "--port 0" in err


def test_serve_port_0_prints_the_port_it_got(monkeypatch, capsys):
    from helpers import need

    need("fastapi", "pip install -e '.[serve]'")
    from nextstep.serve import runner

    served = []
    monkeypatch.setattr(runner.NextStepPipeline, "from_pretrained", lambda *a, **k: "a pipeline")
    monkeypatch.setattr(runner, "create_app", lambda pipe, **k: None)
    monkeypatch.setattr(runner._Server, "run", lambda self, sockets=None: served.append(sockets[0].getsockname()[1]))
    assert main(["serve", "--port", "0"]) == 0
    assert served and served[0] != 0
    assert f"on http://127.0.0.1:{served[0]}/ " in capsys.readouterr().out


def save_png(path, w, h):
    Image.new("RGB", (w, h), (240, 240, 240)).save(path)
    return str(path)


def test_edit_size_advice_is_the_servers(tmp_path, capsys, bundled_pipe):
    """The bundled model holds 512 positions: an edit at 512x512 needs twice 1024. The advice is the largest square
    size that fits (240x240 for this instruction: its own tokens, the input and the output at 15x15 tokens), the one
    function the server's 400 uses too."""
    src = save_png(tmp_path / "512.png", 512, 512)
    out = ["-o", str(tmp_path / "x.png"), "--steps", "2", "--quiet"]
    assert main(["edit", src, "make the circle blue", *out]) == 2
    err = one_line(capsys.readouterr().err)
    side = bundled_pipe.largest_square("make the circle blue", bundled_pipe.resolve_settings(True), edit=True)
    assert side == 240 and "use a smaller size (at most 240x240 with this prompt)" in err, err
    big = save_png(tmp_path / "4096.png", 4096, 4096)
    assert main(["edit", big, "make the circle blue", *out]) == 2
    assert "at most 240x240" in one_line(capsys.readouterr().err)
    assert main(["edit", src, "make the circle blue", "--size", "240x240", *out]) == 0  # the advice works
    assert main(["edit", src, "make the circle blue", "--size", "256x256", *out]) == 2  # and is the largest
    capsys.readouterr()
    assert main(["generate", "a red circle " * 10000, *out]) == 2  # a 100 KB prompt: no size fits
    assert "no size fits this prompt: shorten it" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "vae/config.json"])
def test_a_broken_config_file_is_named(name, tmp_path, capsys):
    import shutil

    from nextstep.pipeline import bundled_model_dir

    model = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), model)
    (model / name).write_text('{"hidden_size":\n}')
    assert main(["generate", "x", "-o", str(tmp_path / "x.png"), "--model", str(model), "--quiet"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"nextstep: error: {model / name} is not "), err


@pytest.mark.parametrize("argv,message", [
    (["eval", "shapes", "--n", "-1"], "--n must be >= 0, got -1"),
    (["eval", "shapes", "--n", "0"], "nothing to score: --n 0 and --edits 0"),
    (["eval", "shapes", "--edits", "-2"], "--edits must be >= 0, got -2"),
    (["eval", "shapes", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["generate-many", "PROMPTS", "--out", "OUT", "-n", "0"], "-n must be >= 1, got 0"),
    (["generate-many", "PROMPTS", "--out", "OUT", "--batch", "0"], "--batch must be >= 1, got 0"),
    (["edit", "DIR", "make it blue", "-o", "OUT/x.png"], "the input image DIR is a directory"),
    (["generate", "", "-o", "OUT/x.png"], "prompt is empty: say what to draw"),
    (["generate", "  \n", "-o", "OUT/x.png"], "prompt is empty: say what to draw"),
    (["edit", "IMAGE", " ", "-o", "OUT/x.png"], "instruction is empty"),
])
def test_messages_name_the_clis_flags_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from nextstep import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    paths = {"PROMPTS": str(tmp_path / "prompts.txt"), "OUT": str(tmp_path / "out"), "DIR": str(tmp_path),
             "IMAGE": save_png(tmp_path / "in.png", 64, 64)}
    argv = [paths.get(a, a).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main([*argv, "--quiet"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err == f"nextstep: error: {message.replace('DIR', str(tmp_path))}\n" or \
        err.startswith(f"nextstep: error: {message.replace('DIR', str(tmp_path))}"), err


def test_sizes_the_model_was_not_trained_at_are_warned_about(tmp_path, capsys):
    """The bundled model was trained at 64x64 only (its generation_config.json says so): other sizes print one
    warning line; 64x64 none."""
    out = ["-o", str(tmp_path / "x.png"), "--steps", "2", "--quiet"]
    assert main(["generate", "a red circle", "--size", "32x32", "-n", "2", *out]) == 0
    assert capsys.readouterr().err == ("nextstep: warning: this model was trained at 64x64 only: at 32x32 it may "
                                       "draw noise rather than a picture\n")
    assert main(["generate", "a red circle", *out]) == 0
    assert capsys.readouterr().err == ""


def test_compile_says_once_that_it_is_compiling(tmp_path, capsys, monkeypatch):
    import torch

    from nextstep.pipeline import COMPILE_NOTICE

    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)  # the message, not the 48 s
    monkeypatch.setattr("nextstep.cli.MAX_IMAGES_PER_CALL", 1)  # two pipeline calls: still one message
    assert main(["generate", "a red circle", "-n", "2", "--compile", "--steps", "2", "-o", str(tmp_path / "x.png"),
                 "--quiet"]) == 0
    assert capsys.readouterr().err.count(COMPILE_NOTICE) == 0  # --quiet: silent
    assert main(["generate", "a red circle", "-n", "2", "--compile", "--steps", "2", "-o",
                 str(tmp_path / "x.png")]) == 0
    assert capsys.readouterr().err.count(COMPILE_NOTICE) == 1


def test_think_with_chunks_prints_the_thoughts_of_each_call(tmp_path, capsys):
    """-n beyond one call: each call thinks anew, and its images follow its own thoughts, so each is printed."""
    out = ["-o", str(tmp_path / "x.png"), "--steps", "2", "--size", "16x16", "--quiet", "--think"]
    assert main(["generate", "a red circle", "-n", "9", *out]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("thoughts")]
    assert [x.split(":")[0] for x in lines] == ["thoughts (images 0-7)", "thoughts (images 8-8)"], lines


def test_every_option_of_every_command_has_help():
    """The README says ``nextstep CMD --help`` lists every option with its default: each argument says what it is."""
    import argparse

    from nextstep.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [(name, b.option_strings or b.dest) for name, sp in commands.items() for b in sp._actions
              if not b.help and not isinstance(b, argparse._HelpAction)]
    assert not silent, silent
