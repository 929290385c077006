"""VAE tokenizer: parity with the official implementation's outputs, the posterior, normalisation, perturbation,
save/load and error messages. CPU, float32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextstep.checkpoint import CheckpointError, load_torch_state_dict
from nextstep.config import ConfigError, VAEConfig
from nextstep.model.vae import VAE, Posterior

TOL = 1e-5
# the decoder against the reference: its ~30 convolutions round differently with oneDNN's AVX2 kernels (1.14e-5 measured
# with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU; within TOL with its AVX-512 kernels)
DECODE_REF_TOL = 2e-5


# ---- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "official-v1-a" / "vae"


@pytest.fixture(scope="module")
def ref(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(fixtures_dir / "official-v1-a" / "reference.safetensors"))


@pytest.fixture(scope="module")
def vae(vae_dir: Path) -> VAE:
    return VAE.from_pretrained(vae_dir)


@pytest.fixture(scope="module")
def official_state(vae_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_torch_state_dict(vae_dir / "checkpoint.pt").items()}


def _meta_vae(**kw) -> VAE:
    """A VAE without weights, enough for the parameter-free methods (normalize, scale, perturb)."""
    with torch.device("meta"):
        return VAE(VAEConfig(**kw))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _copy_official(vae_dir: Path, dst: Path, state: dict[str, torch.Tensor] | None = None,
                   config_update: dict | None = None) -> Path:
    """A writable copy of the official VAE dir, optionally with a different state dict / config."""
    dst.mkdir()
    cfg = json.loads((vae_dir / "config.json").read_text())
    cfg.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    if state is None:
        shutil.copy(vae_dir / "checkpoint.pt", dst / "checkpoint.pt")
    else:
        torch.save(state, dst / "checkpoint.pt")
    return dst


# ---- parity with the reference ----------------------------------------------------------------------------------

def test_loads_official_layout(vae: VAE, fixtures_dir: Path) -> None:
    lines = (fixtures_dir / "official-v1-a" / "vae_state_dict_keys.txt").read_text().split("\n")
    expected = {ln.split()[0]: json.loads(ln.split(" ", 1)[1]) for ln in lines if ln.strip()}
    got = {k: list(v.shape) for k, v in vae.state_dict().items()}
    assert got == expected
    assert not vae.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in vae.parameters())
    # no non-persistent buffers (they would stay on meta after loading by assignment)
    assert set(dict(vae.named_buffers())) <= set(vae.state_dict())


@torch.no_grad()
def test_encode_moments_matches_reference(vae: VAE, ref: dict) -> None:
    assert _max_diff(vae.encode_moments(ref["in.vae_image"]), ref["out.vae_encoder_moments"]) <= TOL


@torch.no_grad()
def test_posterior_matches_reference(vae: VAE, ref: dict) -> None:
    post = vae.encode(ref["in.vae_image"])
    assert post.deterministic
    assert _max_diff(post.mean, ref["out.vae_posterior_mean"]) <= TOL
    assert _max_diff(post.logvar, ref["out.vae_posterior_logvar"]) <= TOL


@torch.no_grad()
def test_normalize_of_reference_moments(vae: VAE, ref: dict) -> None:
    mean = ref["out.vae_encoder_moments"][:, :16]
    assert _max_diff(vae.normalize(mean), ref["out.vae_posterior_mean"]) <= TOL


@torch.no_grad()
def test_decode_of_mean_matches_reference(vae: VAE, ref: dict) -> None:
    assert _max_diff(vae.decode(ref["out.vae_posterior_mean"]), ref["out.vae_decode_of_mean"]) <= DECODE_REF_TOL


@torch.no_grad()
def test_decode_latent_matches_reference(vae: VAE, ref: dict) -> None:
    assert _max_diff(vae.decode(ref["in.vae_latent"]), ref["out.vae_decode_latent"]) <= DECODE_REF_TOL


def test_inference_decode_is_the_training_decode_and_keeps_channels_last(vae: VAE, ref: dict) -> None:
    """Without autograd the decoder overwrites its fresh intermediates (swish, residual adds): the values of the
    autograd path to float rounding, and channels-last latents give a channels-last image (every convolution ran in
    the CPU's faster layout; an add in the wrong operand order once turned the rest of the decoder to NCHW)."""
    z = ref["in.vae_latent"]
    with torch.enable_grad():
        reference_ops = vae.decode(z)
    assert reference_ops.requires_grad  # the autograd path (x * sigmoid(x), out-of-place adds) really ran
    with torch.inference_mode():
        inplace = vae.decode(z)
        cl = vae.decode(z[:1].contiguous(memory_format=torch.channels_last))  # one image: the case that lost it
    assert _max_diff(inplace, reference_ops.detach()) <= TOL
    # channels-last convolutions round differently (the pipeline's DECODE_TOL)
    assert cl.is_contiguous(memory_format=torch.channels_last) and _max_diff(cl, inplace[:1]) <= 2e-4


@torch.no_grad()
def test_forward_shapes_and_mode(vae: VAE, ref: dict) -> None:
    x = ref["in.vae_image"]
    recon, post = vae(x, sample_posterior=False)
    assert recon.shape == x.shape and post.mean.shape == (1, 16, 8, 8)
    # encode then decode: the encoder's rounding (each stage is within TOL above) passes through the decoder, which
    # amplifies it (1.7e-5 on a Zen 5 EPYC with oneDNN held to AVX2 kernels)
    assert _max_diff(recon, ref["out.vae_decode_of_mean"]) <= 4 * TOL
    # deterministic config: sampling gives the mean too
    recon2, _ = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(recon, recon2)


# ---- posterior --------------------------------------------------------------------------------------------------

def test_deterministic_sample_is_mean_and_advances_generator() -> None:
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    post = Posterior(mean, logvar, deterministic=True)
    assert torch.equal(post.std, torch.zeros_like(mean))
    g, g_ref = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(post.sample(g), mean)
    assert torch.equal(post.mode(), mean)
    torch.randn(mean.shape, generator=g_ref)  # what the sample must have consumed
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=g_ref))


def test_stochastic_sample_and_logvar_clamp() -> None:
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.randn(2, 4, 3, 3)
    logvar[0, 0, 0, 0], logvar[0, 0, 0, 1] = -100.0, 100.0
    post = Posterior(mean, logvar, deterministic=False)
    assert post.logvar.min().item() == -30.0 and post.logvar.max().item() == 20.0
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = mean + torch.exp(0.5 * post.logvar) * noise
    assert torch.allclose(post.sample(torch.Generator().manual_seed(3)), expected)


# ---- latent normalisation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("psz", [1, 2])
def test_normalize_zero_mean_unit_variance(psz: int) -> None:
    vae = _meta_vae(norm_patch=psz)
    z = 3.0 + 5.0 * torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    out = vae.normalize(z)
    assert out.shape == z.shape
    b, c, h, w = z.shape
    groups = out.reshape(b, c, h // psz, psz, w // psz, psz).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * psz * psz)
    assert groups.mean(dim=1).abs().max() < 1e-5
    assert (groups.var(dim=1, unbiased=False) - 1).abs().max() < 1e-4
    if psz == 2:  # the groups are the 2x2 patches, not single positions
        per_position = out.permute(0, 2, 3, 1).reshape(-1, c)
        assert per_position.mean(dim=1).abs().max() > 1e-2


def test_normalize_none_and_bad_size() -> None:
    z = torch.randn(1, 16, 4, 4)
    assert _meta_vae(norm="none").normalize(z) is z
    with pytest.raises(ValueError, match="not divisible by the normalisation patch 2"):
        _meta_vae(norm_patch=2).normalize(torch.randn(1, 16, 5, 4))


def test_scale_unscale_inverse() -> None:
    vae = _meta_vae(scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(vae.scale(z), (z - 0.25) * 0.5)
    assert torch.allclose(vae.unscale(vae.scale(z)), z, atol=1e-6)


# ---- perturbation -----------------------------------------------------------------------------------------------

def test_perturb_zero_and_negative() -> None:
    vae = _meta_vae()
    z = torch.randn(2, 16, 4, 4)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert vae.perturb(z, 0.0, g) is z
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ValueError, match="gamma"):
        vae.perturb(z, -0.1)


def test_perturb_per_sample_scale_bounded() -> None:
    vae = _meta_vae()
    gamma, b = 0.8, 512
    z = torch.randn(b, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    out = vae.perturb(z, gamma, torch.Generator().manual_seed(2))
    again = vae.perturb(z, gamma, torch.Generator().manual_seed(2))
    assert torch.equal(out, again)  # reproducible with the same generator
    assert not torch.equal(out, z)
    scale = (out - z).reshape(b, -1).std(dim=1)  # estimate of each sample's s (1024 values each)
    assert scale.max() < gamma * 1.1  # s <= gamma (plus estimation noise of ~2%)
    # s ~ U(0, gamma): mean gamma/2, spread over the whole interval, one value per sample
    assert abs(scale.mean().item() - gamma / 2) < 0.05 * gamma
    assert scale.min() < 0.05 * gamma and scale.max() > 0.95 * gamma
    assert (scale.std() / gamma - 12 ** -0.5) ** 2 < 0.05 ** 2


# ---- save / load ------------------------------------------------------------------------------------------------

def test_save_pretrained_round_trip(vae: VAE, tmp_path: Path) -> None:
    vae.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.json", "model.safetensors"]
    again = VAE.from_pretrained(tmp_path / "ours")
    assert again.config == vae.config
    assert not again.training
    a, b = vae.state_dict(), again.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_from_pretrained_dtype(vae_dir: Path) -> None:
    half = VAE.from_pretrained(vae_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


# ---- errors -----------------------------------------------------------------------------------------------------

def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        VAE.from_pretrained(tmp_path / "nope")


def test_missing_config(vae_dir: Path, tmp_path: Path) -> None:
    d = _copy_official(vae_dir, tmp_path / "vae")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        VAE.from_pretrained(d)


def test_missing_checkpoint(vae_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "vae"
    d.mkdir()
    shutil.copy(vae_dir / "config.json", d / "config.json")
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        VAE.from_pretrained(d)


def test_checkpoint_missing_key(vae_dir: Path, official_state: dict, tmp_path: Path) -> None:
    state = dict(official_state)
    del state["decoder.up.1.upsample.conv.weight"]
    d = _copy_official(vae_dir, tmp_path / "vae", state=state)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.up\.1\.upsample\.conv\.weight"):
        VAE.from_pretrained(d)


def test_checkpoint_extra_key(vae_dir: Path, official_state: dict, tmp_path: Path) -> None:
    state = dict(official_state, **{"encoder.quant_conv.weight": torch.zeros(2)})
    d = _copy_official(vae_dir, tmp_path / "vae", state=state)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.quant_conv\.weight"):
        VAE.from_pretrained(d)


def test_config_contradicts_weights(vae_dir: Path, tmp_path: Path) -> None:
    d = _copy_official(vae_dir, tmp_path / "vae", config_update={"ch": 64})
    with pytest.raises(CheckpointError, match="shape"):
        VAE.from_pretrained(d)


def test_unknown_config_key(vae_dir: Path, tmp_path: Path) -> None:
    d = _copy_official(vae_dir, tmp_path / "vae", config_update={"use_quant_conv": True})
    with pytest.raises(ConfigError, match="use_quant_conv"):
        VAE.from_pretrained(d)


def test_bad_image_sizes(vae: VAE) -> None:
    with pytest.raises(ValueError, match=r"60x64 is not a multiple of 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"not a multiple of 8"):
        vae.encode_moments(torch.zeros(1, 3, 64, 36))
    # the latent must also split into 2x2 normalisation patches: 8 * 2 = 16
    with pytest.raises(ValueError, match=r"40x40 is not a multiple of 16"):
        vae.encode(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        vae.decode(torch.zeros(1, 8, 8, 8))
