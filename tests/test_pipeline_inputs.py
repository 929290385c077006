"""What the Python API says about inputs that run but cannot give what was asked (a size the model was not trained
at), inputs it refuses (a blank prompt, a size beyond its positions) and the slow first compiled call."""

from __future__ import annotations

import warnings

import pytest
import torch

from nextstep.errors import InputError, SizeWarning


@pytest.mark.parametrize("prompt", ["", "   ", ["a red circle", "\n"]])
def test_a_blank_prompt_is_refused(bundled_pipe, prompt):
    """The one rule of the CLI and the server too (``prompt.require_prompt``): it used to draw a picture."""
    with pytest.raises(InputError, match="prompt is empty"):
        bundled_pipe(prompt, num_inference_steps=2, progress=False)


def test_sizes_it_was_not_trained_at_warn(bundled_pipe):
    assert bundled_pipe.defaults.trained_sizes == ("64x64",)  # from the bundled generation_config.json
    with pytest.warns(SizeWarning, match="trained at 64x64 only: at 32x16 it may draw noise"):
        bundled_pipe("a red circle", height=16, width=32, num_inference_steps=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SizeWarning)
        bundled_pipe("a red circle", height=64, width=64, num_inference_steps=2, progress=False)


def test_size_advice_is_the_largest_square_that_fits(bundled_pipe):
    settings = bundled_pipe.resolve_settings(False)
    side = bundled_pipe.largest_square("a red circle", settings, edit=False)
    assert side == 352  # 22x22 tokens + the prompt row within 512 positions
    bundled_pipe._check_length(bundled_pipe.prompt_rows("a red circle", (side // 16,) * 2, settings, False),
                               (side // 16,) * 2)
    with pytest.raises(InputError, match=f"at most {side}x{side} with this prompt"):
        bundled_pipe("a red circle", height=side + 16, width=side + 16, progress=False)
    assert bundled_pipe.largest_square("a red circle", settings, edit=False, max_side=128) == 128
    assert bundled_pipe.largest_square("a red circle " * 200, settings, edit=False) == 0


def test_the_first_compiled_call_says_it_compiles(fixture_pipe, monkeypatch, capsys):
    from nextstep.pipeline import COMPILE_NOTICE, CPU_COMPILE_NOTE

    monkeypatch.setattr(torch, "compile", lambda fn, **k: fn)  # the message, not the compilation
    fixture_pipe.compile()
    try:
        for _ in range(2):
            fixture_pipe("x", height=32, width=16, num_inference_steps=2, progress=False)
        assert capsys.readouterr().err == COMPILE_NOTICE + CPU_COMPILE_NOTE + "\n"  # on a CPU: eager is faster
        fixture_pipe.compile(announce=False)
        fixture_pipe("x", height=32, width=16, num_inference_steps=2, progress=False)
        assert capsys.readouterr().err == ""
    finally:
        fixture_pipe._decode_step, fixture_pipe._cache_bucket = fixture_pipe.decode_step, 1
