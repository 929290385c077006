"""RL post-training foundations: recorded rollouts, exact per-step log-probabilities, GRPO loss, rewards."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.data.shapes import generate_edit, generate_t2i, render
from nextstep.errors import InputError
from nextstep.images import to_pil
from nextstep.rl import (
    Prompt,
    RewardError,
    all_steps,
    conditions,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    grpo_loss,
    load_reward,
    random_steps,
    reward_metrics,
    rollout,
    set_trainable,
    step_stats,
)
from nextstep.sampling.token import TOKEN_NORM_EPS

SIZE = 32  # 2 x 2 image tokens
SETTINGS = dict(num_inference_steps=4, guidance_scale=2.0, image_guidance_scale=1.5, guidance_schedule="linear")


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prompts(fixture, edit: bool) -> list[Prompt]:
    source = Image.open(fixture / "edit_input.png") if edit else None
    return [Prompt("a red circle", source), Prompt("two blue squares", source)]


def roll(pipe, fixture, sampler: str = "flow_sde", edit: bool = False, group: int = 2, seed: int = 0, **kw):
    return rollout(pipe, prompts(fixture, edit), group, SIZE, SIZE, seeded(seed), sampler=sampler,
                   **{**SETTINGS, **kw})


@pytest.fixture
def context_noise(fixture_pipe):
    """Tokens fed back with context noise (as the bundled model does): the rollout must record them."""
    fixture_pipe.model.config.context_noise = 0.3
    yield 0.3
    fixture_pipe.model.config.context_noise = 0.0


# ---- log-probabilities -------------------------------------------------------------------------------------------
def test_gaussian_log_prob_equals_torch_normal():
    g = seeded(0)
    mean = torch.randn(5, 7, 64, generator=g)
    for std in (torch.tensor(0.3), torch.rand(7, 1, generator=g) + 0.05):
        x = mean + std * torch.randn(mean.shape, generator=g)  # as a head step draws it
        want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).sum(-1)
        assert (gaussian_log_prob(x, mean, std) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler", ["flow_sde", "cps"])
def test_rollout_records_the_pipelines_own_samples(fixture_pipe, fixture, sampler, context_noise):
    """The recorded trajectory is the one the pipeline drew: its last state token-normed is the image token, each
    step's sample is mean + std * (fresh N(0, 1)), the recorded log-probs are torch's Normal, and the tokens fed
    back carry the context noise."""
    r = roll(fixture_pipe, fixture, sampler)
    plain = fixture_pipe([p.text for p in r.prompts], height=SIZE, width=SIZE, num_images_per_prompt=2,
                         generator=seeded(0), sampler=sampler, progress=False, output_type="pt", **SETTINGS)
    x_last = r.states[:, :, -1]
    assert torch.equal(torch.nn.functional.layer_norm(x_last, (64,), eps=TOKEN_NORM_EPS), plain.tokens)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(r.images, to_pil(plain.images)))
    random = r.std > 0
    assert random.tolist() == [True, True, True, sampler == "flow_sde"]  # cps ends with a deterministic step
    w = (r.states[:, :, 1:][:, :, random] - r.mean[:, :, random]) / r.std[random, None]
    assert abs(w.mean()) < 0.1 and abs(w.std() - 1) < 0.1
    want = torch.distributions.Normal(r.mean[:, :, random], r.std[random, None].expand_as(r.mean[:, :, random]))
    assert (r.log_prob[:, :, random] - want.log_prob(r.states[:, :, 1:][:, :, random]).sum(-1)).abs().max() <= 1e-5
    tokens = plain.tokens[:, :-1]
    assert abs((r.fed - tokens).std() - context_noise) < 0.05


def test_group_noise_shares_start_and_context_noise_within_a_prompt(fixture_pipe, fixture, context_noise):
    """group_noise: a prompt's images start every token from the same noise and feed it back with the same context
    noise (so fed - token is the same), differ by the head steps' noise, and the log-probs stay exact."""
    r = roll(fixture_pipe, fixture, group=3, group_noise=True)  # 2 prompts x 3 images
    start = r.states[:, :, 0]
    for p in range(2):
        rows = slice(3 * p, 3 * p + 3)
        assert torch.equal(start[rows][0], start[rows][1]) and torch.equal(start[rows][0], start[rows][2])
        assert not torch.equal(r.states[rows][0, :, 1], r.states[rows][1, :, 1])  # the first step's own noise
    assert not torch.equal(start[0], start[3])
    noise = r.fed - torch.nn.functional.layer_norm(r.states[:, :-1, -1], (64,), eps=TOKEN_NORM_EPS)  # context noise
    assert (noise[0] - noise[1]).abs().max() <= 1e-5 and (noise[0] - noise[3]).abs().max() > 0.1
    random = r.std > 0
    want = torch.distributions.Normal(r.mean[:, :, random], r.std[random, None].expand_as(r.mean[:, :, random]))
    assert (r.log_prob[:, :, random] - want.log_prob(r.states[:, :, 1:][:, :, random]).sum(-1)).abs().max() <= 1e-5


@pytest.mark.parametrize("sampler,edit", [("flow_sde", False), ("cps", True), ("flow_sde", True)])
def test_recomputed_log_probs_equal_recorded_and_first_ratios_are_one(fixture_pipe, fixture, sampler, edit,
                                                                      context_noise):
    r = roll(fixture_pipe, fixture, sampler, edit)
    model, steps = fixture_pipe.model, all_steps(r)
    assert len(steps) == 4 * (4 if sampler == "flow_sde" else 3)
    with torch.no_grad():
        old = step_stats(model, r, steps)
    rec = r.log_prob[:, steps.token, steps.step]
    assert torch.allclose(old.log_prob, rec, rtol=1e-6, atol=1e-4), (old.log_prob - rec).abs().max()
    assert (old.mean - r.mean[:, steps.token, steps.step]).abs().max() <= 1e-5
    new = step_stats(model, r, steps)  # the first update: same weights, the trainer's own arithmetic
    out = grpo_loss(new.log_prob, old.log_prob, group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.5]), 2), clip=0.2)
    m = out.metrics
    assert m["ratio_min"] == m["ratio_max"] == 1.0 and m["clip_fraction"] == 0.0
    # a minibatch of images recomputes to the same values as in the full batch
    sub = r.select([3, 0])
    with torch.no_grad():
        part = step_stats(model, sub, steps)
    assert torch.allclose(part.log_prob, old.log_prob[[3, 0]], rtol=1e-6, atol=1e-4)


# ---- the GRPO update ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["head", "head+last_layers", "all"])
def test_an_update_moves_the_log_prob_with_the_sign_of_the_advantage(fixture_pipe, fixture, which, context_noise):
    r = roll(fixture_pipe, fixture, edit=which == "all").select([1])
    steps = all_steps(r)
    for sign in (1.0, -1.0):
        model = copy.deepcopy(fixture_pipe.model)
        params = set_trainable(model, which)
        opt = torch.optim.SGD(params, lr=1e-3)
        with torch.no_grad():
            before = step_stats(model, r, steps).log_prob
        out = grpo_loss(step_stats(model, r, steps).log_prob, before, torch.tensor([sign]), clip=0.2)
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            after = step_stats(model, r, steps).log_prob
        assert sign * (after.sum() - before.sum()) > 0, (which, sign, float(after.sum() - before.sum()))


def test_group_advantages_have_zero_mean_and_equal_rewards_give_zero_gradient(fixture_pipe, fixture):
    rewards = torch.tensor([0.2, 0.9, 0.4, 0.1, 1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    adv = group_advantages(rewards, 4).view(3, 4)
    assert adv.mean(1).abs().max() <= 1e-6
    assert torch.equal(adv[2], torch.zeros(4))  # 0.1 four times: its mean rounds, the advantage must not
    assert torch.allclose(adv[:2].std(1, correction=0), torch.ones(2), atol=1e-3)
    # a group whose rewards differ by a rounding-level PSNR term: near +-1 at GRPO's eps, damped by a larger eps,
    # while a clear win keeps most of its size
    near, clear = torch.tensor([0.999, 1.0, 1.0, 0.999]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    assert group_advantages(near, 4).abs().min() > 0.8  # 0.0005 / (0.0005 + 1e-4)
    assert group_advantages(near, 4, eps=0.1).abs().max() < 0.01
    assert group_advantages(clear, 4, eps=0.1)[1] == pytest.approx(0.75 / (3 ** 0.5 / 4 + 0.1), rel=1e-5)
    metrics = reward_metrics(rewards, 4)
    assert metrics["flat_groups"] == pytest.approx(1 / 3) and metrics["reward_mean"] == pytest.approx(4 / 12)

    r = roll(fixture_pipe, fixture)
    model, ref = copy.deepcopy(fixture_pipe.model), fixture_pipe.model
    set_trainable(model, "all")
    steps = random_steps(r, 6, seeded(1))
    with torch.no_grad():
        old, ref_stats = step_stats(model, r, steps), step_stats(ref, r, steps)
    new = step_stats(model, r, steps)
    flat = group_advantages(torch.tensor([0.3, 0.3, 0.7, 0.7]), 2)
    out = grpo_loss(new.log_prob, old.log_prob, flat, clip=0.2, kl=gaussian_kl(new.mean, ref_stats.mean, new.std),
                    kl_weight=0.1)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert out.metrics["kl"] == 0.0


def test_kl_is_the_exact_gaussian_kl_and_reference_pulls_back(fixture_pipe, fixture):
    g = seeded(2)
    m, m_ref, std = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g), torch.rand(5, 1) + 0.1
    s = std.expand_as(m)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m, s), torch.distributions.Normal(m_ref, s))
    assert torch.allclose(gaussian_kl(m, m_ref, std), want.sum(-1), rtol=1e-5)

    # a policy moved away from the reference: a KL-only step brings its means back towards the reference's
    r = roll(fixture_pipe, fixture)
    steps = all_steps(r)
    model = copy.deepcopy(fixture_pipe.model)
    params = set_trainable(model, "head")
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        ref = step_stats(fixture_pipe.model, r, steps)
    cond = conditions(model, r).detach()  # frozen backbone: the conditions are computed once
    kls = []
    for _ in range(2):
        new = step_stats(model, r, steps, cond)
        kl = gaussian_kl(new.mean, ref.mean, new.std)
        out = grpo_loss(new.log_prob, new.log_prob.detach(), torch.zeros(4), clip=0.2, kl=kl, kl_weight=1.0)
        kls.append(out.metrics["kl"])
        out.loss.backward()
        torch.optim.SGD(params, lr=1e-4).step()
        model.zero_grad()
    assert 0 < kls[1] < kls[0]


def test_parameter_sets_and_step_choices(fixture_pipe, fixture):
    model = copy.deepcopy(fixture_pipe.model)
    head = {id(p) for p in model.image_head.parameters()}
    assert {id(p) for p in set_trainable(model, "head")} == head
    last = set_trainable(model, "head+last_layers", last_layers=1)
    assert head < {id(p) for p in last} and model.transformer.layers[-1].mlp.down_proj.weight.requires_grad
    assert not model.transformer.layers[0].mlp.down_proj.weight.requires_grad
    assert len(set_trainable(model, "all")) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="parameter set must be one of"):
        set_trainable(model, "lora")
    with pytest.raises(ValueError, match="last_layers"):
        set_trainable(model, "head+last_layers", last_layers=99)

    r = roll(fixture_pipe, fixture, "cps")
    every = all_steps(r)
    assert set(every.step.tolist()) == {0, 1, 2}  # the deterministic last step is not a policy step
    pick = random_steps(r, 5, seeded(3))
    pairs = set(zip(pick.token.tolist(), pick.step.tolist()))
    assert len(pairs) == 5 and pairs <= set(zip(every.token.tolist(), every.step.tolist()))
    assert torch.equal(random_steps(r, 5, seeded(3)).token, pick.token)


def test_bad_rollouts_are_clear_errors(fixture_pipe, fixture):
    mixed = [Prompt("a"), Prompt("b", Image.open(fixture / "edit_input.png"))]
    with pytest.raises(InputError, match="all text-to-image or all edits"):
        rollout(fixture_pipe, mixed, 2, SIZE, SIZE, sampler="flow_sde")
    with pytest.raises(InputError, match="Gaussian transitions"):
        rollout(fixture_pipe, [Prompt("a")], 2, SIZE, SIZE, sampler="sde")
    with pytest.raises(InputError, match="noise_level must be > 0 for rollouts"):
        rollout(fixture_pipe, [Prompt("a")], 2, SIZE, SIZE, sampler="cps", noise_level=0.0)
    with pytest.raises(InputError, match="num_inference_steps must be >= 2 for rollouts"):
        rollout(fixture_pipe, [Prompt("a")], 2, SIZE, SIZE, sampler="cps", num_inference_steps=1)
    with pytest.raises(InputError, match="group"):
        rollout(fixture_pipe, [Prompt("a")], 0, SIZE, SIZE, sampler="cps")


# ---- rewards -----------------------------------------------------------------------------------------------------
def test_builtin_shapes_rewards():
    rng = np.random.default_rng(0)
    caption, spec, scene = generate_t2i("two_objects", rng, 64)
    truth, blank = render(scene), Image.new("RGB", (64, 64), "white")
    t2i = [Prompt(caption, spec=spec)] * 2
    assert load_reward("shapes")([truth, blank], t2i).tolist() == [1.0, 0.0]
    graded = load_reward("shapes_graded")([truth, blank], t2i)
    assert graded[0] == 1.0 and 0.0 <= graded[1] < 0.5
    source, instruction, target, espec = generate_edit("recolor", rng, 64)
    edit = [Prompt(instruction, render(source), espec)] * 2
    done, untouched = load_reward("shapes")([render(target), render(source)], edit).tolist()
    assert done == pytest.approx(1.0) and untouched == pytest.approx(1 / 3)  # preserved but not edited
    with pytest.raises(RewardError, match="Prompt.spec"):
        load_reward("shapes")([truth], [Prompt(caption)])


def test_user_reward_is_loaded_and_called(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import numpy as np\n"
        "calls = []\n"
        "def brightness(images, prompts, sources):\n"
        "    calls.append((len(images), list(prompts), list(sources)))\n"
        "    return [int(np.asarray(im.convert('L')).sum()) / (255 * im.width * im.height) for im in images]\n"
        "class Judge:\n"
        "    @staticmethod\n"
        "    def score(images, prompts, sources):\n"
        "        return [len(p) for p in prompts]\n"
        "def broken(images, prompts, sources):\n"
        "    raise RuntimeError('judge offline')\n"
        "def short(images, prompts, sources):\n"
        "    return [1.0]\n"
        "def nan(images, prompts, sources):\n"
        "    return [float('nan')] * len(images)\n"
        "def words(images, prompts, sources):\n"
        "    return ['good'] * len(images)\n"
        "value = 3\n")
    (tmp_path / "bad_rewards.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_rewards

    images = [Image.new("RGB", (8, 8), "white"), Image.new("RGB", (8, 8), "black")]
    src = Image.new("RGB", (8, 8), "gray")
    batch = [Prompt("make it white", src), Prompt("make it black", src)]
    scores = load_reward("my_rewards:brightness")(images, batch)
    assert scores.dtype == torch.float32 and scores.tolist() == [1.0, 0.0]
    assert my_rewards.calls == [(2, ["make it white", "make it black"], [src, src])]
    assert load_reward("my_rewards:Judge.score")(images, batch).tolist() == [13.0, 13.0]

    for name, match in [("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                        ("bad_rewards:f", "cannot import module 'bad_rewards' .RuntimeError: needs a GPU"),
                        ("my_rewards:missing", "has no 'missing'"), ("my_rewards:value", "not a callable"),
                        ("my_rewards", "'module:function'"), ("clip_score", "'module:function'")]:
        with pytest.raises(RewardError, match=match):
            load_reward(name)
    for name, match in [("broken", "failed on a batch of 2 images: RuntimeError: judge offline"),
                        ("short", r"shape \(1,\) for 2 images"), ("nan", "non-finite"), ("words", "not 2 numbers")]:
        with pytest.raises(RewardError, match=match):
            load_reward(f"my_rewards:{name}")(images, batch)
