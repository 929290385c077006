"""The README's examples work as written: the Python API block runs, and what it draws is what it asks for."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from nextstep.eval.shapes import analyze, describe

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs_and_draws_what_it_asks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_api_block(), "README.md", "exec"), namespace)  # noqa: S102 - our own README
    made = analyze(Image.open(tmp_path / "shapes.png"))
    assert describe(made) == "red circle, blue square on white"
    circle, square = sorted(made.objects, key=lambda o: o.shape)  # "circle" < "square"
    assert circle.cy < square.cy  # above
    assert describe(analyze(Image.open(tmp_path / "edited.png"))) == "green circle, blue square on white"
    assert isinstance(namespace["pipe"].defaults.resolve(False).num_inference_steps, int)
    torch._dynamo.reset()  # the block compiled the decode step; leave no state to later tests


def test_commands_and_page_prompts_are_in_the_bundled_models_world():
    """Every prompt the README's shell examples give the bundled model, and the web page's placeholder, use words the
    shapes world knows (the bundled model draws them), e.g. not "on the left", which it never saw."""
    from nextstep.data.shapes import ShapesDataset

    ds = ShapesDataset(2000, seed=0)
    vocabulary = {w for i in range(len(ds)) for w in re.findall(r"[a-z]+", ds[i].get("caption", "")
                                                                 + " " + ds[i].get("instruction", ""))}
    page = (Path(__file__).resolve().parents[1] / "nextstep" / "serve" / "static" / "index.html").read_text()
    commands = re.findall(r'nextstep (?:generate|edit \S+) "([^"]+)"([^\n]*)', README.read_text())
    prompts = [p for p, rest in commands if "--model" not in rest and p not in ("PROMPT", "INSTRUCTION", "...")]
    prompts += re.findall(r'id="prompt"[^>]*placeholder="([^"]+)"', page)
    assert prompts
    for prompt in prompts:
        unknown = set(re.findall(r"[a-z]+", prompt)) - vocabulary
        assert not unknown, (prompt, unknown)
    # and the bundled model draws each named object with the CLI's default seed
    from nextstep import NextStepPipeline

    pipe = NextStepPipeline.from_pretrained()
    out = pipe(prompts, generator=[torch.Generator().manual_seed(0) for _ in prompts], progress=False)
    for prompt, image in zip(prompts, out.images):
        found = describe(analyze(image))
        for color, shape in re.findall(r"(red|orange|yellow|green|blue|purple|black|gray) (circle|square|triangle)",
                                       prompt):
            assert f"{color} {shape}" in found, (prompt, found)


def test_what_the_readme_makes_is_ignored_by_git():
    """The setup's .venv/ and every PNG the README's commands write in the checkout (out.png, shapes_0.png,
    shapes_grid.png, fast.png, grid.png, edited.png) stay out of `git status`."""
    import shutil
    import subprocess

    root = README.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        import pytest

        pytest.skip("not a git checkout")
    made = [".venv/bin/python"] + sorted(set(re.findall(r"(?<![\w/.-])([\w-]+\.png)\b", README.read_text())))
    made = [m for m in made if not (root / m).exists() or m.startswith(".venv")]
    out = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=root, capture_output=True, text=True)
    assert sorted(out.stdout.split()) == sorted(made), out.stdout
