"""Parallel decoding's trained correction of the state after a draft (``NextStep.reread``, ``nextstep train-reread``):
what the decoder records for it is the state after each token (the images unchanged), training moves the corrected
state toward it on held-out prompts, the export decodes sequentially as before and in parallel with the correction,
and the trainer gives 2 processes = 1 and resumes after kill -9 like every trainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import finish, kill_at_checkpoint, maxdiff, run_cli, seeded
from nextstep.errors import ConfigError, InputError
from nextstep.pipeline import NextStepPipeline
from nextstep.sampling.guidance import Guidance
from nextstep.train.conditions import teacher_forced
from nextstep.train.config import RereadConfig, from_dict
from nextstep.train.reread import holdout_error, train_reread

TOL = 2e-5  # cached against uncached, float32 (test_parallel)


def recipe(out: Path, **over) -> dict:
    r = {"run": {"out_dir": str(out), "steps": 150, "batch_size": 64, "seed": 1, "log_every": 10, "ckpt_every": 50},
         "data": {"source": "shapes", "num_samples": 12, "mix": {"t2i": 0.7, "edit": 0.3}, "seed": 5},
         "optim": {"lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.0, "grad_clip": 0.0},
         "width": 64, "fast_fraction": 1.0, "prompts_per_call": 8, "holdout": 3}
    for k, v in over.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) else v
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("k", [2, 3])
def test_recorded_states_are_the_states_after_each_token_and_change_no_image(fixture_pipe, k):
    """Each recorded state (the state after a drafted token's own token, from one more forward) is the teacher-forced
    state after that token on the image's tokens, and recording leaves the image bit for bit as it was."""
    pipe = fixture_pipe
    pipe.model.config.parallel_tokens = 1  # (the module's model may have been made parallel by another test)
    pipe.model.enable_parallel(k, seeded(3))
    with torch.no_grad():
        for q in pipe.model.image_ahead.parameters():
            q.normal_(0, 0.1, generator=seeded(5))
    prompt, steps = "a red circle above a blue square", 3
    run = dict(generator=seeded(0), output_type="latent", progress=False, parallel=k, num_inference_steps=steps,
               height=64, width=64)
    plain = pipe(prompt, **run).tokens
    with pipe.recording_rereads() as rec:
        out = pipe(prompt, **{**run, "generator": seeded(0)})
    assert torch.equal(out.tokens, plain)
    total = out.grid[0] * out.grid[1]
    # one per forward that read a draft: all but a final group that ends the image (its last token is not drafted)
    assert len(rec) == sum(s + k != total for s in range(0, total - 1, k))
    settings = pipe.resolve_settings(False, num_inference_steps=steps)
    guidance = Guidance.from_settings(settings, False)
    want = teacher_forced(pipe.model, [pipe.prompt_rows(prompt, out.grid, settings, False)],
                          pipe.tokenizer.special.pad, guidance.branches, None, out.tokens[:, :-1], out.grid)
    for g, (_, after, drafted, token, exact) in enumerate(rec):
        t = k * (g + 1) - 1  # the group's last token (drafted), whose state the next group's first is drawn from
        assert torch.equal(token[:1, 0], out.tokens[:, t])  # no context noise on the fixture model
        assert maxdiff(drafted, token) > 1e-3  # a draft, not the token
        with torch.no_grad():
            got = pipe.model.condition(exact, torch.tensor([[t + 1]] * exact.shape[0]), out.grid)
        assert maxdiff(got[:, 0], want[:, t + 1]) <= TOL, t
        assert maxdiff(after, exact) > 1e-3  # the state after the draft differs


def test_a_correction_needs_a_parallel_model_and_starts_at_zero(fixture_pipe):
    model = fixture_pipe.model
    model.config.parallel_tokens = 1
    with pytest.raises(InputError, match="parallel decoding"):
        model.enable_reread(8)
    model.enable_parallel(2, seeded(1))
    model.enable_reread(8, seeded(2))
    before, after = torch.randn(2, 1, model.config.transformer.hidden_size, generator=seeded(4)).unbind(0)
    drafted, token = torch.randn(2, 1, model.config.token_dim, generator=seeded(6)).unbind(0)
    assert torch.equal(model.reread(before[None], after[None], drafted[None], token[None]), after[None])
    del model.image_reread
    model.config.reread_width = 0
    with pytest.raises(ConfigError, match="fast_fraction"):
        from_dict(RereadConfig, {"fast_fraction": 2})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A correction trained in this process on the bundled model: text-to-image and edits, fast mode and defaults."""
    out = tmp_path_factory.mktemp("reread") / "one"
    r = recipe(out, data={"num_samples": 10}, fast_fraction=0.7)
    return r, train_reread(from_dict(RereadConfig, r), progress=False)


def test_training_moves_the_state_toward_the_state_after_the_token(trained, bundled_pipe):
    r, final = trained
    out = Path(r["run"]["out_dir"])
    log = metrics(out)
    errors = [m["holdout_error"] for m in log if "holdout_error" in m]
    path = next(out.glob("targets-*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        held = int(f.metadata()["holdout"])
    targets = load_file(str(path))
    train = {k: v[:len(v) - held] for k, v in targets.items()}
    assert held > 0 and len(errors) == 3  # held-out errors logged with each checkpoint (12 prompts generalise little)
    pipe = NextStepPipeline.from_pretrained(final)  # the export
    uncorrected, corrected = (holdout_error(f, train, 0) for f in (lambda b, a, d, t: a, pipe.model.reread))
    assert corrected < 0.7 * uncorrected, (corrected, uncorrected)  # on the training rows
    losses = [m["loss"] for m in log]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    # the export: the bundled model (fast head, VAE, defaults) with the correction; sequential decoding unchanged
    assert pipe.model.config.reread_width == 64 and pipe.head is not None
    assert pipe.model.image_reread.fc2.weight.abs().max() > 0
    def tokens(p, parallel):
        return p("a red circle", generator=seeded(2), output_type="latent", progress=False, fast=True,
                 parallel=parallel).tokens

    assert torch.equal(tokens(pipe, 1), tokens(bundled_pipe, 1))
    assert maxdiff(tokens(pipe, 2), tokens(bundled_pipe, 2)) > 1e-4  # the correction is used


@pytest.mark.slow  # subprocesses: 2 processes (DDP), a killed run and its resumption
def test_two_processes_equal_one_and_kill_and_resume(trained, tmp_path):
    r, final = trained
    one = Path(r["run"]["out_dir"])
    a = load_file(str(final / "model.safetensors"))
    a = {k: v for k, v in a.items() if k.startswith("image_reread.")}
    assert len(a) == 4

    def reuse_targets(out: Path) -> None:
        out.mkdir()
        for f in one.glob("targets-*.safetensors"):  # the same cached targets: built once
            shutil.copy(f, out / f.name)

    def weights(out: Path) -> dict:
        return {k: v for k, v in load_file(str(out / "final" / "model.safetensors")).items() if k in a}

    cfg = tmp_path / "r.json"
    cfg.write_text(json.dumps({**r, "run": {**r["run"], "out_dir": str(tmp_path / "unused")}}))
    reuse_targets(tmp_path / "two")
    finish(run_cli(["train-reread", str(cfg), "--out", str(tmp_path / "two"), "--quiet"], nproc=2))
    for x, y in zip(metrics(one), metrics(tmp_path / "two"), strict=True):
        assert x["step"] == y["step"] and abs(x["loss"] - y["loss"]) <= 1e-5 * abs(x["loss"]), (x, y)
    # Adam turns the last bits of the gradients into whole steps where they are near zero: 150 steps at lr 1e-3 leave
    # the weights 1e-5 apart with AVX-512 kernels (AMD EPYC Zen 4) and 1.4e-3 of their largest value with oneDNN's
    # AVX2 ones; a rank's lost or doubled gradient moves them far more
    for k, v in weights(tmp_path / "two").items():
        assert maxdiff(v, a[k]) <= 4e-3 * float(a[k].abs().max()), k
    reuse_targets(tmp_path / "b")
    kill_at_checkpoint(run_cli(["train-reread", str(cfg), "--out", str(tmp_path / "b"), "--quiet"]), tmp_path / "b",
                       50)
    assert not (tmp_path / "b" / "final").exists()
    finish(run_cli(["train-reread", str(cfg), "--out", str(tmp_path / "b"), "--quiet", "--resume"]))
    for k, v in weights(tmp_path / "b").items():
        assert torch.equal(v, a[k]), k
