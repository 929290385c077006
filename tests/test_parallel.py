"""Parallel decoding (``parallel=K``): K image tokens per backbone forward on a model trained for it
(``NextStepConfig.parallel_tokens``). Each token's condition while decoding is the one training teaches
(``NextStep.conditions``, teacher-forced), batches equal single prompts, masked edits keep their tokens, and a model
that was not trained for it says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import maxdiff, run_cli, seeded
from nextstep.data.shapes import edit_set
from nextstep.errors import InputError
from nextstep.images import fit_image, load_image
from nextstep.model.latents import patchify, token_mask
from nextstep.pipeline import NextStepPipeline
from nextstep.prompt import caption_ids
from nextstep.sampling.guidance import Guidance
from nextstep.sampling.token import FewStepSampler, TokenSampler
from nextstep.train.ar import batch_counts
from nextstep.train.conditions import teacher_forced

STEPS = 3  # these tests are about which states condition which token, not picture quality
SIZE = dict(height=64, width=64)  # 16 tokens
TOL = 2e-5  # cached (a group of tokens per forward) against uncached (one forward over the sequence), float32


@pytest.fixture(scope="module")
def pipe(fixture):
    """The official-layout fixture model with random parallel-decoding parameters for 3 tokens per hidden state."""
    p = NextStepPipeline.from_pretrained(fixture / "model", fixture / "vae")
    p.model.enable_parallel(3)
    g = seeded(5)
    with torch.no_grad():
        for q in p.model.image_ahead.parameters():
            q.normal_(0, 0.1, generator=g)
    return p


class Recorder:
    """Records every condition the pipeline computes, (ahead, index, value, forwards run before it), and every
    forward: the tokens it reads and their slots."""

    def __init__(self, pipe):
        self.pipe, self.conds, self.fed, self.prevs, self.rereads = pipe, [], [], [], []

    def __enter__(self):
        model, pipe = self.pipe.model, self.pipe
        self.condition, self.step, self.reread = model.condition, pipe._decode_step, model.reread

        def reread(before, after, drafted, token):
            out = self.reread(before, after, drafted, token)
            self.rereads.append((before, after, drafted, token, out, len(self.fed)))
            return out

        def condition(hidden, index=None, grid=None, prev=None, ahead=1):
            out = self.condition(hidden, index, grid, prev, ahead)
            self.conds += [(ahead, int(t), out[:, j].detach().clone(), len(self.fed)) for j, t in enumerate(index[0])]
            if prev is not None:  # the token before, as read back (the group's last is never fed to the backbone)
                self.prevs.append((int(index[0, 0]) - 1, prev[:1, 0].clone(), len(self.fed)))
            return out

        def step(tokens, input_pos, cache):
            self.fed.append((input_pos.clone(), tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).clone()))
            return self.step(tokens, input_pos, cache)

        model.condition, pipe._decode_step, model.reread = condition, step, reread
        return self

    def __exit__(self, *exc):
        del self.pipe.model.condition, self.pipe.model.reread
        self.pipe._decode_step = self.step


@pytest.mark.parametrize("k", [1, 2, 3])
def test_each_tokens_condition_is_the_teacher_forced_one(pipe, k):
    """Decoding K tokens per forward: each group's drafts are conditioned on the state before the group and the draft
    (or token) before them, and every image token on the state just before it, given the tokens the backbone had
    read then (drafts included): exactly what ``NextStep.conditions`` computes in training (one forward, no cache).
    Drafts and the tokens drawn again for them are drawn without noise, and each forward reads the previous group's
    tokens over their drafts, so the cache ends holding the image."""
    prompt, settings = "a red circle above a blue square", pipe.resolve_settings(False, num_inference_steps=STEPS)
    finished = []  # per image token, when it is final: the conditions computed so far
    with Recorder(pipe) as rec:
        record = lambda i, n, x: finished.append((i - 1, [c[:2] for c in rec.conds]))  # noqa: E731
        out = pipe._generate(prompt, generator=seeded(0), output_type="latent", progress=False, parallel=k,
                             num_inference_steps=STEPS, callback=record, **SIZE)
    total = out.grid[0] * out.grid[1]
    assert [t for t, _ in finished] == list(range(total))
    assert all((1, t) in seen for t, seen in finished)  # each image token from the state just before it
    # drafts: every token but a group's first (and the last token, never read back), ahead t % k + 1
    drafted = [t for t in range(1, total - 1) if t % k]
    assert sorted((a, t) for a, t, *_ in rec.conds) == sorted([(1, t) for t in range(total)] +
                                                              [(t % k + 1, t) for t in drafted])
    assert len(rec.fed) == -(-(total - 1) // k)  # forwards: ceil((total - 1) / k)
    first = int(rec.fed[0][0][0])  # the cache slot of token 0
    # the tokens each forward reads, by raster index; after forward f the cache holds them over earlier ones
    reads = [dict(zip((pos - first).tolist(), x.unbind(1))) for pos, x in rec.fed]
    held = [{}]
    for r in reads:
        held.append({**held[-1], **r})
    blank = torch.zeros_like(rec.fed[0][1][:, 0])
    guidance = Guidance.from_settings(settings, False)
    ids = [pipe.prompt_rows(prompt, out.grid, settings, False)]
    start = {a: sum(total - b + 1 for b in range(1, a)) for a in range(1, k + 1)}  # where each ahead's block begins

    def sequence(f, s, ahead):  # what a condition made after f forwards read: a draft also the group about to be read
        seq = {**held[f], **({t: x for t, x in reads[f].items() if t >= s} if ahead > 1 else {})}
        return torch.stack([seq.get(t, blank) for t in range(total - 1)], 1)

    # a group's next token is drawn from the state after the last draft, corrected toward the token drawn for it
    # (NextStep.reread): one correction per forward that read a draft, the condition moved by it
    model = pipe.model
    final = {t: got for a, t, got, _ in rec.conds if a == 1}  # each token's condition, once
    moved = {}
    for before, after, draft, token, state, f in rec.rereads:
        t = next(t for t in range(total - 1) if t in reads[f - 1] and torch.equal(reads[f - 1][t], draft[:1, 0]))
        assert torch.equal(token[:1, 0], out.tokens[:, t]) and t in drafted  # no context noise on the fixture model
        with torch.no_grad():
            assert maxdiff(model.condition(before, torch.tensor([[t]]), out.grid)[:, 0], final[t]) <= 1e-5  # drew t
            assert maxdiff(state, model.reread(before, after, draft, token)) == 0
            moved[t + 1] = model.image_out_projector(state[:, 0]) - model.image_out_projector(after[:, 0])
    assert len(moved) == len(rec.rereads) == sum(any(t in drafted and t not in held[f] for t in r)
                                                 for f, r in enumerate(reads))
    worst = 0.0
    for a, t, got, f in rec.conds:
        want = teacher_forced(pipe.model, ids, pipe.tokenizer.special.pad, guidance.branches, None,
                              sequence(f, t - a + 1, a), out.grid, k)
        got = got - moved[t] if a == 1 and t in moved else got
        worst = max(worst, maxdiff(got, want[:, start[a] + t - a + 1]))
    assert worst <= TOL, worst
    for t, x, f in rec.prevs:  # the token before each draft, as the head was given it: what the next forward reads
        assert torch.equal(x, reads[f][t]), t
    # every draft is read over by the image's token in the next forward (the last forward's drafts have none)
    for t in range(total - 1):
        assert torch.equal(held[-1][t], out.tokens[:, t]) == (t not in drafted or t in held[-2]), t
    # drafts, and the image's tokens drawn again for them, without noise
    sampler = TokenSampler(pipe.model.image_head, guidance, settings, len(guidance.branches), pipe.device,
                           torch.float32, exact=False)
    zero = torch.zeros(sampler.draws, 1, out.tokens.shape[-1])
    with torch.no_grad():
        for a, t, cond, f in rec.conds:
            central = sampler(cond, guidance.scales_at(t, total), zero)
            if a > 1:  # a draft, read as drawn
                assert maxdiff(central, reads[f][t]) <= 1e-5, t
            elif t in drafted:
                assert maxdiff(central, out.tokens[:, t]) <= 1e-5, t
            elif t > 0:
                assert maxdiff(central, out.tokens[:, t]) > 1e-2, t  # the others keep their noise


def test_the_ahead_parameters_matter(pipe):
    """The same call with the parallel parameters zeroed draws other drafts, so other tokens after the first draft
    read back (the test above would pass for a decoder that ignored them only if they did nothing). Token 1 is drawn
    from the state after token 0, which the draft of token 1 does not reach."""
    kw = dict(generator=seeded(0), output_type="latent", progress=False, parallel=2, num_inference_steps=STEPS, **SIZE)
    a = pipe("a green triangle", **kw).tokens
    fc2 = pipe.model.image_ahead.fc2
    saved = fc2.weight.detach().clone()
    try:
        with torch.no_grad():
            fc2.weight.zero_()
        b = pipe("a green triangle", **{**kw, "generator": seeded(0)}).tokens
    finally:
        with torch.no_grad():
            fc2.weight.copy_(saved)
    assert torch.equal(a[:, :2], b[:, :2]) and not torch.equal(a[:, 2], b[:, 2])


def test_batch_equals_single(bundled_pipe):
    """On the bundled (trained) model at its K = 2: random weights amplify float rounding ~2x per token."""
    pipe = bundled_pipe
    prompts = ["a red circle", "two blue squares to the left of a yellow triangle"]
    kw = dict(output_type="latent", progress=False, parallel=2, num_inference_steps=STEPS, **SIZE)
    batch = pipe(prompts, generator=[seeded(1), seeded(2)], **kw).tokens
    for i, p in enumerate(prompts):
        single = pipe(p, generator=seeded(i + 1), **kw).tokens
        assert maxdiff(batch[i], single[0]) <= 1e-3  # as sequential decoding: float rounding of other row counts
    # with every row padded to one length and the same number of rows, a prompt's tokens are exactly its own
    fixed = dict(kw, prompt_length=40)
    a = pipe._generate([prompts[0], prompts[1]], generator=[seeded(1), seeded(2)], **fixed).tokens
    b = pipe._generate([prompts[0], prompts[0]], generator=[seeded(1), seeded(7)], **fixed).tokens
    assert torch.equal(a[0], b[0])


def test_masked_edit_keeps_its_tokens(pipe):
    source, instruction, _ = edit_set(1, 0, 64)[0]
    region = np.zeros((64, 64), dtype=bool)
    region[16:32, 16:32] = True  # token (1, 1)
    alpha = np.where(region, 0, 255).astype(np.uint8)
    mask = Image.fromarray(np.dstack([np.full((64, 64, 3), 200, np.uint8), alpha]), "RGBA")
    out = pipe._generate(instruction, image=source, mask=mask, mask_margin=0, generator=seeded(0), progress=False,
                         parallel=2, num_inference_steps=STEPS, output_type="pt")
    with torch.no_grad():
        inputs = patchify(pipe.encode_latents([fit_image(load_image(source), 64, 64)]), 2)[0].float()
    generated = token_mask(torch.from_numpy(region)[None], out.grid, 0)[0]
    assert torch.equal(out.tokens[0, ~generated], inputs[~generated])
    assert not torch.equal(out.tokens[0, generated], inputs[generated])


def test_more_than_trained_is_refused_with_the_models_limit(pipe, fixture_pipe):
    with pytest.raises(InputError, match="parallel must be at most 3 for this model"):
        pipe("a red circle", parallel=4, progress=False)
    with pytest.raises(InputError, match="parallel must be at most 1"):  # a model not trained for it
        fixture_pipe("a red circle", parallel=2, progress=False)
    with pytest.raises(InputError, match="observe"):
        pipe._generate("a red circle", parallel=2, progress=False, observe=lambda *a: None)
    with pytest.raises(InputError, match="parallel"):
        pipe("a red circle", parallel=0, progress=False)


def test_the_bundled_model_decodes_two_tokens_per_forward(tmp_path):
    """The bundle's adapter (trained alone on the frozen model): --parallel 2 reaches the pipeline, 3 is refused."""
    out = tmp_path / "a.png"
    p = run_cli(["generate", "a green triangle", "--parallel", "2", "-o", str(out)])
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and Image.open(out).size == (64, 64), text
    assert "2 image tokens per forward" in text  # the settings line says so
    p = run_cli(["generate", "a red circle", "--parallel", "3", "--out", str(tmp_path / "b.png")])
    text, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "--parallel must be at most 2 for this model" in text, text


def test_training_counts_every_ahead_row(pipe):
    """The loss's flow rows: n per image for ahead 1, n - 1 for ahead 2, ...: what the trainer normalises by."""
    model = pipe.model
    tok = pipe.tokenizer
    ids = caption_ids(tok, "a red circle", []) + [model.config.boi_id] + [model.config.image_placeholder_id] * 16 + [
        model.config.eoi_id]
    z = torch.randn(1, 16, 8, 8, generator=seeded(3))
    out = model.loss(torch.tensor([ids]), [z[0]], generator=[seeded(4)])
    from nextstep.data.sequences import TrainBatch

    batch = TrainBatch(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       latents=[z[0]], image_loss_mask=torch.ones(1), image_seeds=[0], num_samples=1,
                       num_tokens=len(ids))
    rows = batch_counts(batch, model.config)[1]
    assert out.im_count == rows == (16 + 15 + 14) * model.config.head.batch_mul


def test_enabling_parallel_changes_no_output(fixture, fixture_pipe):
    """A K = 1 model given the parameters for K = 3 decodes sequentially exactly as before: fine-tuning for parallel
    decoding starts from the model as it was."""
    kw = dict(output_type="latent", progress=False, num_inference_steps=STEPS, **SIZE)
    before = fixture_pipe("a red circle", generator=seeded(0), **kw).tokens
    p = NextStepPipeline.from_pretrained(fixture / "model", fixture / "vae")
    p.model.enable_parallel(3)
    assert torch.equal(p("a red circle", generator=seeded(0), **kw).tokens, before)
    # a fresh adapter adds nothing yet: its last layer is zero
    a = p.model.image_ahead
    assert not a.fc2.weight.any() and not a.fc2.bias.any() and a.fc1.weight.any()


def test_server_decodes_in_parallel_on_request(bundled_pipe):
    """A request's "parallel" reaches the pipeline (its images are the Python call's); /health gives the limit."""
    import base64
    import io

    from helpers import local, need

    need("fastapi", "pip install -e '.[serve]'")
    from nextstep.serve.routes import create_app

    body = {"prompt": "a green triangle", "size": "64x64", "steps": STEPS, "seed": 3, "parallel": 2,
            "response_format": "b64_json"}
    with local(create_app(bundled_pipe)) as c:
        assert c.get("/health").json()["model"]["parallel_tokens"] == 2
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
        assert c.post("/v1/images/generations", json={**body, "parallel": 3}).status_code == 400
    want = bundled_pipe("a green triangle", generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS,
                        parallel=2, progress=False).images[0]
    assert np.array_equal(got, np.asarray(want))


@pytest.mark.parametrize("fast", [False, True])
def test_several_tokens_in_one_head_call_equal_one_by_one(bundled_pipe, fast):
    """Parallel decoding draws a group's tokens in one head call (rows token by token within each guidance branch,
    a guidance schedule's scales per row): the tokens of separate calls, to float rounding (other row counts)."""
    pipe, n, tokens = bundled_pipe, 3, 2
    schedule = {} if fast else {"guidance_schedule": "linear"}  # the distilled head keeps its teacher's
    settings = pipe.resolve_settings(False, fast, num_inference_steps=4, **schedule)
    guidance = pipe.guidance(settings, False)
    copies = len(guidance.branches)
    if fast:  # the bundled head reads both branches too (its other-branch rows: branch-major like the teacher's)
        sampler = FewStepSampler(pipe.head, settings, copies * n, pipe.device, torch.float32, guidance.branches)
        assert copies == 2
    else:
        sampler = TokenSampler(pipe.model.image_head, guidance, settings, copies * n, pipe.device, torch.float32,
                               exact=False)
        assert copies == 2
    g = seeded(3)
    cond = torch.randn(tokens, sampler.rows, 256, generator=g)  # per token: its guidance branches' rows
    noise = torch.randn(sampler.draws, tokens, n, 64, generator=g)
    scales = [guidance.scales_at(k, 16) for k in (5, 6)]
    with torch.no_grad():
        one_by_one = [sampler(cond[t], scales[t], noise[:, t]) for t in range(tokens)]
        rows = cond.unflatten(1, (copies, n)).transpose(0, 1).flatten(0, 2)  # branch, token, image
        per_row = tuple(torch.tensor(s).repeat_interleave(n)[:, None] for s in zip(*scales))
        together = sampler(rows, per_row, noise.flatten(1, 2)).unflatten(0, (tokens, n))
    assert fast or scales[0] != scales[1]  # the schedule gives the two tokens other scales
    for t in range(tokens):
        assert maxdiff(together[t], one_by_one[t]) <= 1e-5
    assert maxdiff(one_by_one[0], one_by_one[1]) > 0.1
