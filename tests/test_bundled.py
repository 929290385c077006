"""The bundled model: works with no download, and a fast evaluation subset guards against regressions in loading
and sampling (numbers measured when the model was bundled; see README "Bundled model")."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nextstep.cli import main
from nextstep.eval.shapes import analyze, evaluate_pipeline

# accuracy (%) per category on `evaluate_pipeline(pipe, 10, seed=0)` at the bundled defaults, one thread
MEASURED = {"single_object": 100.0, "two_objects": 60.0, "counting": 90.0, "colors": 90.0, "position": 100.0,
            "color_attribution": 100.0}
TOLERANCE = 10.0  # one prompt of ten
# edits on `evaluate_pipeline(..., n_edits=12)` (same call): success (%) within one edit, mean PSNR outside within 1 dB
MEASURED_EDITS_N, MEASURED_EDITS, MEASURED_EDITS_PSNR = 12, 75.0, 33.76


@pytest.fixture(scope="module")
def pipe(bundled_pipe):
    return bundled_pipe


def test_generate_without_arguments_writes_an_image(tmp_path, one_thread):
    out = tmp_path / "x.png"
    assert main(["generate", "a green triangle", "-o", str(out), "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    # the README's first command (default seed 0) draws what it asks for, as the evaluator reads it
    assert [(d.color, d.shape) for d in analyze(Image.open(out)).objects] == [("green", "triangle")]


def test_bundled_model_draws_shapes(pipe):
    out = pipe(["a red circle", "a blue square", "a yellow triangle", "a purple circle"], output_type="np",
               generator=torch.Generator().manual_seed(0), progress=False)
    far = (abs(out.images - out.images[:, :1, :1]).sum(-1) > 0.4).mean(axis=(1, 2))  # share of non-background
    assert (far > 0.01).sum() >= 2 and (far < 0.5).all(), far


@pytest.mark.slow
def test_evaluation_subset_matches_measured_numbers(pipe, one_thread):
    res = evaluate_pipeline(pipe, 10, 0, n_edits=MEASURED_EDITS_N, progress=False)
    got = {k: v for k, v in res["categories"].items()}
    for k, v in MEASURED.items():
        assert abs(got[k] - v) <= TOLERANCE, (k, got[k], v)
    assert abs(res["edits"]["success"] - MEASURED_EDITS) <= 100 / MEASURED_EDITS_N + 1e-6, res["edits"]
    assert abs(res["edits"]["psnr_outside"] - MEASURED_EDITS_PSNR) <= 1.0, res["edits"]
