"""``nextstep generate-many``: prompt files, per-image seeds, the GenEval layout, 2 processes == 1, kill -9 and resume.

Runs on the bundled model at 64x64 (16 image tokens) with few flow steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nextstep.cli import main
from nextstep.config import SamplingConfig
from nextstep.errors import InputError
from nextstep.generate_many import RUN_FILE, Job, image_seed, is_complete_png, read_prompts
from nextstep.pipeline import bundled_model_dir

PROMPTS = [  # GenEval-style lines (tag / include / prompt), kept byte for byte in metadata.jsonl
    '{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"}',
    '{"tag": "two_object", "include": [{"class": "square", "count": 1}, {"class": "triangle", "count": 1}], '
    '"prompt": "a blue square on the left of a green triangle"}',
    '{"prompt":"two yellow stars","tag":"counting","include":[{"class":"star","count":2}]}',
    '{"tag": "colors", "prompt": "a purple circle"}',
    '{"tag": "position", "prompt": "a green square above a red circle", "exclude": []}',
    '{"tag": "colors", "prompt": "a white triangle"}',
    '{"tag": "counting", "prompt": "three blue circles"}',
    '{"tag": "single_object", "prompt": "a yellow square"}',
    '{"tag": "colors", "prompt": "an orange star"}',
    '{"tag": "two_object", "prompt": "a red triangle and a blue star"}',
    '{"tag": "single_object", "prompt": "a green circle"}',
]
N = 2  # images per prompt
# batch 2 over 11 prompts: 6 units, the last one short; prompts of different lengths share a call (left padding)
ARGS = ["-n", str(N), "--batch", "2", "--size", "64x64", "--steps", "6", "--layout", "geneval", "--seed", "7"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "evaluation_metadata.jsonl"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory) -> Path:
    """One uninterrupted single-process run (in this process, one thread like the subprocesses)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert main(["generate-many", str(prompts_file), "--out", str(out), "--quiet", *ARGS]) == 0
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def samples(out: Path) -> list[Path]:
    """The images with their final names (pathlib's glob would also match the hidden temporaries)."""
    return [q for q in out.glob("*/samples/*.png") if re.fullmatch(r"\d+\.png", q.name)]


def cli(args: list[str], nproc: int = 1) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "nextstep.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + (os.getpid() + 500) % 1000), "-m", "nextstep.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ---- prompt files -------------------------------------------------------------------------------------------------
def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  a blue square  \n")
    items = read_prompts(txt)
    assert [(i.index, i.prompt) for i in items] == [(0, "a red circle"), (1, "a blue square")]
    assert json.loads(items[1].line) == {"prompt": "a blue square"} == items[1].metadata

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x", "tag": "t", "include": [1]}\n\n{"prompt": "y"}\n')
    items = read_prompts(jl)
    assert [i.prompt for i in items] == ["x", "y"]
    assert items[0].metadata == {"prompt": "x", "tag": "t", "include": [1]}
    assert items[0].line == '{"prompt": "x", "tag": "t", "include": [1]}'  # as given


@pytest.mark.parametrize("name, text, message", [
    ("missing.txt", None, "prompts file not found"),
    ("blank.txt", "\n  \n\n", "holds no prompts"),
    ("blank.jsonl", "", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', "line 3: not valid JSON"),
    ("nokey.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', "line 2: each line must be a JSON object"),
    ("list.jsonl", '["a"]\n', "line 1: each line must be a JSON object"),
    ("prompts.csv", "a\n", "must end in .txt"),
])
def test_bad_prompt_files(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError, match=re.escape(message)):
        read_prompts(path)
    assert main(["generate-many", str(path), "--out", str(tmp_path / "out")]) == 2  # before any model is loaded
    err = capsys.readouterr().err
    assert message in err and err.startswith("nextstep: error:")
    assert not (tmp_path / "out").exists()


def test_image_seeds():
    seeds = {image_seed(7, i, k) for i in range(200) for k in range(8)}
    assert len(seeds) == 1600 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(7, 3, 1) == image_seed(7, 3, 1) != image_seed(8, 3, 1)
    # pinned: a change would silently mix two seed rules in one resumed run
    assert image_seed(0, 0, 0) == 8768843472723984521


# ---- the GenEval layout -------------------------------------------------------------------------------------------
def test_geneval_layout_matches_the_scorer(reference, prompts_file):
    """GenEval's README: <IMAGE_FOLDER>/<index:05>/metadata.jsonl (the index-th line of evaluation_metadata.jsonl)
    and <index:05>/samples/<k:04>.png; evaluate_images.py reads folders whose names are digits, json.loads their
    metadata.jsonl and scores every samples/ file matching \\d+\\.png. Replayed here."""
    top = sorted(os.listdir(reference))
    assert top == [f"{i:05d}" for i in range(len(PROMPTS))] + [RUN_FILE, "manifest.jsonl"]
    scored = []
    for sub in os.listdir(reference):  # evaluate_images.main, without the detector
        folder = reference / sub
        if not folder.is_dir() or not sub.isdigit():
            continue
        assert (folder / "metadata.jsonl").read_text() == PROMPTS[int(sub)] + "\n"
        with open(folder / "metadata.jsonl") as fp:
            assert json.load(fp) == json.loads(PROMPTS[int(sub)])
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        assert sorted(os.listdir(folder / "samples")) == [f"{k:04d}.png" for k in range(N)]
        for name in os.listdir(folder / "samples"):
            assert re.match(r"\d+\.png", name)
            with Image.open(folder / "samples" / name) as im:
                assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
            scored.append((int(sub), int(name[:4])))
    assert sorted(scored) == [(i, k) for i in range(len(PROMPTS)) for k in range(N)]

    lines = [json.loads(x) for x in (reference / "manifest.jsonl").read_text().splitlines()]
    assert [(d["prompt_index"], d["image_index"]) for d in lines] == sorted(scored)
    line = lines[3]  # prompt 1, image 1
    assert line["prompt"] == "a blue square on the left of a green triangle"
    assert line["metadata"] == json.loads(PROMPTS[1]) and line["path"] == "00001/samples/0001.png"
    assert line["seed"] == image_seed(7, 1, 1)
    s = line["settings"]
    assert (s["num_inference_steps"], s["size"], s["batch"], s["dtype"]) == (6, [64, 64], 2, "float32")
    # the seeds are distinct images: no two samples of a prompt are equal
    assert (reference / "00000/samples/0000.png").read_bytes() != (reference / "00000/samples/0001.png").read_bytes()


# ---- ranks and resumption -----------------------------------------------------------------------------------------
@pytest.mark.slow  # torchrun: two processes, each loading the model
def test_two_processes_write_exactly_the_images_of_one(reference, prompts_file, tmp_path):
    out = tmp_path / "two"
    p = cli(["generate-many", str(prompts_file), "--out", str(out), *ARGS], nproc=2)
    log, _ = p.communicate(timeout=300)
    assert p.returncode == 0, log
    assert f"{len(PROMPTS) * N} images: {len(PROMPTS) * N} generated, 0 already there" in log
    assert files(out) == files(reference)  # same names, same PNG bytes, same manifest and run file


@pytest.mark.slow  # a subprocess killed with SIGKILL mid-run, then resumed
def test_kill_and_resume_redoes_and_loses_nothing(reference, prompts_file, tmp_path, capsys):
    out = tmp_path / "killed"
    p = cli(["generate-many", str(prompts_file), "--out", str(out), "--quiet", *ARGS])
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline and not samples(out):
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    written = {q: (q.stat().st_ino, q.stat().st_mtime_ns) for q in samples(out)}
    assert 0 < len(written) < len(PROMPTS) * N, "the kill did not land mid-run"
    assert all(is_complete_png(q) for q in written)
    (out / "00004" / "samples" / ".tmp-leftover.png").write_bytes(b"\x89PNG half")  # what a kill mid-write leaves

    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS]) == 0
    err = capsys.readouterr().err
    total = len(PROMPTS) * N
    assert f"{total} images: {total - len(written)} generated, {len(written)} already there" in err
    assert {q: (q.stat().st_ino, q.stat().st_mtime_ns) for q in written} == written  # not rewritten
    assert files(out) == files(reference)  # nothing lost, nothing different, the leftover gone

    # a truncated image (a copy cut short) is made again, nothing else is touched
    victim = out / "00002" / "samples" / "0001.png"
    victim.write_bytes(victim.read_bytes()[:100])
    others = {q: q.stat().st_mtime_ns for q in samples(out) if q != victim}
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert f"{total} images: 1 generated, {total - 1} already there" in capsys.readouterr().err
    assert {q: q.stat().st_mtime_ns for q in others} == others
    assert files(out) == files(reference)


def test_resume_refuses_other_settings(reference, prompts_file, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    before = files(out)
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS, "--cfg", "2"]) == 2
    err = capsys.readouterr().err
    assert "it differs in --cfg;" in err and "new output directory" in err
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS[:-2], "--seed", "8"]) == 2
    assert "it differs in --seed;" in capsys.readouterr().err
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS, "--parallel", "2"]) == 2
    assert "it differs in --parallel;" in capsys.readouterr().err
    edited = tmp_path / "edited.jsonl"  # the run's words, never its record's keys (prompts_sha256)
    edited.write_text(prompts_file.read_text().replace("a red circle", "a red square"))
    assert main(["generate-many", str(edited), "--out", str(out), *ARGS]) == 2
    assert "it differs in the prompts;" in capsys.readouterr().err
    assert files(out) == before
    # the same settings: nothing to do, nothing written
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert f"0 generated, {len(PROMPTS) * N} already there" in capsys.readouterr().err
    assert files(out) == before
    # a run recorded before a setting existed (here: parallel) resumes: the setting's default is what it used
    run_file = out / "generate-many.json"
    record = json.loads(run_file.read_text())
    del record["settings"]["parallel"]
    run_file.write_text(json.dumps(record))
    assert main(["generate-many", str(prompts_file), "--out", str(out), *ARGS]) == 0
    assert f"0 generated, {len(PROMPTS) * N} already there" in capsys.readouterr().err


def test_job_checks_its_arguments(tmp_path):
    items = read_prompts_from(tmp_path, "a red circle\n")
    settings = SamplingConfig.from_model_dir(bundled_model_dir()).resolve(False)
    for bad, message in (({"layout": "dpg"}, "layout must be one of"), ({"n": 0}, "n must be an integer >= 1"),
                         ({"batch": 1.5}, "batch must be an integer >= 1")):
        with pytest.raises(InputError, match=message):
            Job(items, tmp_path / "o", settings=settings, **bad)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="is a file, not a directory"):
        Job(items, tmp_path / "file", settings=settings).prepare(is_main=True)


def read_prompts_from(tmp_path: Path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return read_prompts(path)
