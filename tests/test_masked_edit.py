"""Masked editing (``pipe(prompt, image=..., mask=...)``): outside the mask the output is the input, pixel for pixel;
tokens away from the mask are the input's; a full mask is the unmasked edit; bad masks are clear errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import events, local, need, seeded
from nextstep.data.shapes.dataset import edit_set
from nextstep.errors import InputError
from nextstep.images import fit_image, fit_mask, load_image, load_mask
from nextstep.model.latents import patchify, token_mask

STEPS = 4  # few sampler steps: these tests are about which tokens and pixels, not picture quality


@pytest.fixture(scope="module")
def pipe(bundled_pipe):
    return bundled_pipe


@pytest.fixture(scope="module")
def cases():
    return edit_set(2, 0, 64)  # [(64x64 source, instruction, spec)]


def rgba(edit: np.ndarray) -> Image.Image:
    """OpenAI's convention: alpha 0 where ``edit`` (H, W) is true, opaque elsewhere (the colour does not matter)."""
    alpha = np.where(edit, 0, 255).astype(np.uint8)
    rgb = np.full((*edit.shape, 3), 200, np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def box(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def edit(pipe, case, mask=None, **kw):
    source, instruction, _ = case
    kw = dict(num_inference_steps=STEPS, generator=seeded(0), progress=False, **kw)
    return pipe._generate(instruction, image=source, mask=mask, **kw)


def input_tokens(pipe, source: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """(h*w, token_dim) tokens of the input image at the output size, as the pipeline encodes it."""
    with torch.no_grad():
        z = pipe.encode_latents([fit_image(load_image(source), *size)])
    return patchify(z, pipe.model.config.patch_size)[0].float()


def test_outside_the_mask_the_output_is_the_input(pipe, cases):
    region = box(64, 64, 20, 37, 5, 30)  # straddles tokens: the composite follows the pixels
    out = edit(pipe, cases[0], rgba(region))
    got, src = np.asarray(out.images[0]), np.asarray(cases[0][0])
    assert (got[~region] == src[~region]).all()
    assert (got[region] != src[region]).any()  # the edit happened somewhere inside
    pt = edit(pipe, cases[0], rgba(region), output_type="pt").images[0]  # (3, H, W) in [0, 1]
    assert torch.equal(pt[:, ~torch.from_numpy(region)], (load_image(cases[0][0]) / 2 + 0.5)[:, ~torch.from_numpy(
        region)].clamp(0, 1))


@pytest.mark.parametrize("margin", [0, 1])
def test_tokens_away_from_the_mask_are_the_input_tokens(pipe, cases, margin):
    region = box(64, 64, 16, 32, 16, 32)  # exactly token (1, 1) of the 4 x 4 grid
    out = edit(pipe, cases[0], rgba(region), mask_margin=margin)
    generated = token_mask(torch.from_numpy(region)[None], out.grid, margin)[0]
    assert int(generated.sum()) == (1 if margin == 0 else 9)
    inputs = input_tokens(pipe, cases[0][0], (64, 64))
    assert torch.equal(out.tokens[0, ~generated], inputs[~generated])
    assert not torch.equal(out.tokens[0, generated], inputs[generated])  # sampled: not a copy


def test_generated_tokens_draw_the_unmasked_runs_noise(pipe, cases):
    """Kept tokens still draw their noise: the first token, in the mask, is the unmasked run's first token."""
    region = box(64, 64, 0, 16, 0, 16)
    masked = edit(pipe, cases[0], rgba(region), mask_margin=0)
    plain = edit(pipe, cases[0])
    assert torch.equal(masked.tokens[0, 0], plain.tokens[0, 0])
    assert not torch.equal(masked.tokens[0, 1:], plain.tokens[0, 1:])


@pytest.mark.parametrize("kw", [{}, {"image_guidance_scale": 1.0, "num_images_per_prompt": 2}])
def test_a_full_mask_is_the_unmasked_edit(pipe, cases, kw):
    full = rgba(np.ones((64, 64), dtype=bool))
    masked = edit(pipe, cases[0], full, output_type="pt", **kw)
    plain = edit(pipe, cases[0], output_type="pt", **kw)
    assert torch.equal(masked.tokens, plain.tokens) and torch.equal(masked.images, plain.images)


def test_batch_with_one_mask_per_image(pipe, cases):
    regions = [box(64, 64, 0, 20, 0, 64), box(64, 64, 40, 64, 10, 50)]
    out = pipe([c[1] for c in cases], image=[c[0] for c in cases], mask=[rgba(r) for r in regions],
               num_images_per_prompt=2, num_inference_steps=STEPS, generator=seeded(1), progress=False)
    for i, im in enumerate(out.images):  # a prompt's images in a row
        region, src = regions[i // 2], np.asarray(cases[i // 2][0])
        assert (np.asarray(im)[~region] == src[~region]).all()
    one = pipe(cases[1][1], image=cases[1][0], mask=rgba(regions[0]), num_images_per_prompt=2,
               num_inference_steps=STEPS, generator=seeded(1), progress=False)  # one mask for every image: fine
    assert all((np.asarray(im)[~regions[0]] == np.asarray(cases[1][0])[~regions[0]]).all() for im in one.images)


def test_mask_is_resized_with_the_input(pipe, cases):
    source = cases[0][0].resize((96, 64), Image.BICUBIC)
    region = box(64, 96, 10, 30, 40, 60)
    out = pipe(cases[0][1], image=source, mask=rgba(region), height=64, width=64, num_inference_steps=STEPS,
               generator=seeded(0), progress=False, output_type="pt")
    fitted = fit_mask(torch.from_numpy(region), 64, 64)
    assert fitted.shape == (64, 64) and fitted[12:28, 26:44].all() and not fitted[40:].any()
    expected = (fit_image(load_image(source), 64, 64) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(out.images[0][:, ~fitted], expected[:, ~fitted])


def test_latent_output_keeps_the_input_tokens(pipe, cases):
    region = box(64, 64, 0, 16, 48, 64)
    out = edit(pipe, cases[0], rgba(region), mask_margin=0, output_type="latent")
    assert out.images.shape == (1, 16, 8, 8)
    inputs = input_tokens(pipe, cases[0][0], (64, 64))
    assert torch.equal(patchify(out.images, 2)[0, :3], inputs[:3])


def test_mask_conventions():
    edit_area = box(8, 8, 2, 5, 1, 7)
    assert torch.equal(load_mask(rgba(edit_area)), torch.from_numpy(edit_area))
    la = rgba(edit_area).convert("LA")
    assert torch.equal(load_mask(la), torch.from_numpy(edit_area))
    alpha = torch.from_numpy(np.where(edit_area, 0.0, 1.0)).float()
    for t in (alpha, alpha[None], torch.cat([torch.rand(3, 8, 8), alpha[None]]), torch.cat([torch.rand(3, 8, 8),
                                                                                            alpha[None]])[None]):
        assert torch.equal(load_mask(t), torch.from_numpy(edit_area))
    half = alpha.clone()
    half[edit_area] = 0.5  # partly transparent is not "fully transparent": kept
    half[0, 0] = 0.0
    assert int(load_mask(half).sum()) == 1


def test_fit_mask_and_token_mask():
    m = torch.zeros(48, 80, dtype=torch.bool)
    m[20, 40] = True  # one pixel: still in the mask after any resize
    assert fit_mask(m, 48, 80) is m
    for size in ((32, 32), (16, 16), (96, 160)):
        assert fit_mask(m, *size).any()
    px = torch.zeros(1, 64, 64, dtype=torch.bool)
    px[0, 17, 63] = True  # token (1, 3)
    assert token_mask(px, (4, 4)).view(4, 4).nonzero().tolist() == [[1, 3]]
    assert token_mask(px, (4, 4), 1).view(4, 4).nonzero().tolist() == [[0, 2], [0, 3], [1, 2], [1, 3], [2, 2],
                                                                       [2, 3]]


def test_bad_masks_are_clear_errors(pipe, cases, tmp_path):
    source, instruction, _ = cases[0]
    region = box(64, 64, 0, 16, 0, 16)

    def call(mask, **kw):
        args = dict(image=source, num_inference_steps=STEPS, progress=False)
        args.update(kw)
        return pipe._generate(instruction, mask=mask, **args)

    with pytest.raises(InputError, match=r"no alpha channel \(mode RGB\).*alpha 0"):
        call(rgba(region).convert("RGB"))
    with pytest.raises(InputError, match="no fully transparent pixel"):
        call(rgba(np.zeros((64, 64), dtype=bool)))
    with pytest.raises(InputError, match=r"the mask is 32x32 but the input image is 64x64"):
        call(rgba(box(32, 32, 0, 8, 0, 8)))
    with pytest.raises(InputError, match="needs an input image"):
        call(rgba(region), image=None)
    with pytest.raises(InputError, match="got 3 masks for 1 input images"):
        call([rgba(region)] * 3)
    with pytest.raises(InputError, match="shape"):
        call(torch.zeros(2, 64, 64))
    with pytest.raises(InputError, match="floats"):
        call(torch.zeros(64, 64, dtype=torch.uint8))
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        call(torch.full((64, 64), 255.0))
    with pytest.raises(FileNotFoundError, match="mask image not found"):
        call(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read mask image"):
        call(bad)
    with pytest.raises(TypeError, match="mask must be"):
        call(3)
    with pytest.raises(InputError, match="mask_margin"):
        call(rgba(region), mask_margin=-1)
    with pytest.raises(InputError, match="observe"):
        call(rgba(region), observe=lambda *a: None)


# ---- the command line ----------------------------------------------------------------------------------------------
def test_cli_edit_with_a_mask(tmp_path, cases, one_thread):
    from nextstep.cli import main

    src, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    cases[0][0].save(src)
    region = box(64, 64, 30, 50, 10, 40)
    rgba(region).save(mask)
    assert main(["edit", str(src), cases[0][1], "--mask", str(mask), "-o", str(out), "--steps", str(STEPS),
                 "--quiet"]) == 0
    got, before = np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(src).convert("RGB"))
    assert (got[~region] == before[~region]).all()


def test_cli_bad_masks_are_one_line_errors(tmp_path, cases, capsys):
    from nextstep.cli import main

    src, out = tmp_path / "in.png", tmp_path / "out.png"
    cases[0][0].save(src)
    rgba(box(64, 64, 0, 8, 0, 8)).convert("RGB").save(tmp_path / "rgb.png")
    rgba(box(32, 32, 0, 8, 0, 8)).save(tmp_path / "small.png")
    for mask, message in (("rgb.png", "no alpha channel"), ("small.png", "is 32x32 but the input image is 64x64"),
                          ("missing.png", "not found")):
        assert main(["edit", str(src), "x", "--mask", str(tmp_path / mask), "-o", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not out.exists()


# ---- the server ----------------------------------------------------------------------------------------------------
def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def server(pipe):
    need("fastapi", "pip install -e '.[serve]'")
    from nextstep.serve.routes import create_app

    with local(create_app(pipe, queue_size=4)) as c:
        yield c


def test_server_edit_with_a_mask(server, cases):
    region = box(64, 64, 8, 40, 20, 52)
    files = [("image[]", ("a.png", png(cases[0][0]), "image/png")), ("mask", ("m.png", png(rgba(region)), "image/png"))]
    data = {"prompt": cases[0][1], "steps": str(STEPS), "seed": "3"}
    r = server.post("/v1/images/edits", files=files, data=data)
    assert r.status_code == 200, r.text
    got, src = decoded(r.json()["data"][0]["b64_json"]), np.asarray(cases[0][0])
    assert (got[~region] == src[~region]).all() and (got[region] != src[region]).any()
    lines = server.post("/v1/images/edits/stream", files=files, data=data).text.splitlines()
    final = [d for name, d in events(lines) if name == "final"][0]
    assert final["data"] == r.json()["data"]  # the same seed: the same image


def test_server_bad_masks_are_400s(server, cases):
    image = ("image", ("a.png", png(cases[0][0]), "image/png"))
    data = {"prompt": "x", "steps": str(STEPS)}
    for mask, words in ((rgba(box(32, 32, 0, 8, 0, 8)), "the mask is 32x32 but the image is 64x64"),
                        (rgba(np.zeros((64, 64), dtype=bool)), "no fully transparent pixel"),
                        (rgba(box(64, 64, 0, 8, 0, 8)).convert("RGB"), "no alpha channel")):
        r = server.post("/v1/images/edits", files=[image, ("mask", ("m.png", png(mask), "image/png"))], data=data)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "mask"
    one = ("mask", ("m.png", png(rgba(box(64, 64, 0, 8, 0, 8))), "image/png"))
    r = server.post("/v1/images/edits", files=[image, one, one], data=data)
    assert r.status_code == 400 and "got 2 masks" in r.json()["error"]["message"]
    r = server.post("/v1/images/edits", files=[image], data={**data, "mask": "everything"})
    assert r.status_code == 400 and "must be a file upload" in r.json()["error"]["message"]
    r = server.post("/v1/images/edits", files=[image, ("mask", ("m.png", b"", "image/png"))], data=data)
    assert r.status_code == 400 and "the mask file is empty" in r.json()["error"]["message"]


def test_openai_client_sends_a_mask(pipe, cases):
    need("openai", "pip install -e '.[dev]'")
    import openai

    from nextstep.serve.routes import create_app
    from nextstep.serve.runner import running_server

    region = box(64, 64, 30, 60, 0, 30)
    with running_server(create_app(pipe, queue_size=2)) as base:
        c = openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0, timeout=60)
        out = c.images.edit(image=("a.png", png(cases[1][0])), mask=("m.png", png(rgba(region))),
                            prompt=cases[1][1], extra_body={"steps": STEPS, "seed": 1})
    got, src = decoded(out.data[0].b64_json), np.asarray(cases[1][0])
    assert (got[~region] == src[~region]).all()
