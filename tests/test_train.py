"""Training on generated data: losses fall, golden values, kill + resume, 1 vs 2 processes, export, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import one_two_and_resumed
from nextstep.config import ConfigError, VAEConfig
from nextstep.errors import InputError
from nextstep.model.vae import VAE
from nextstep.pipeline import NextStepPipeline
from nextstep.train.ar import train as train_ar
from nextstep.train.config import TrainConfig, VAETrainConfig, from_dict
from nextstep.train.vae import train as train_vae

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
# first losses of the AR run in `ar_config` (seed 0, one thread); a change in the model math, the data plan, the
# sequence layout or the optimiser shows up here
GOLDEN_AR = [2.077487, 2.03459, 2.040417, 2.035923, 1.971604]


def make_dataset(root: Path, n: int = 24, size: int = 32, corrupt: int = 0) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLORS)[i % 3]
        a = np.full((size, size, 3), 255, np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        a[y:y + size // 2, x:x + size // 2] = COLORS[name]
        Image.fromarray(a).save(root / f"{i}.png")
        lines.append({"image": f"{i}.png", "caption": f"a {name} square"})
        if i % 4 == 0:
            lines.append({"source": f"{i}.png", "target": f"{(i + 1) % n}.png", "instruction": "change it"})
    lines.append({"text": "squares are nice"})
    for j in range(corrupt):
        (root / f"bad{j}.png").write_bytes(b"not an image")
        lines.append({"image": f"bad{j}.png", "caption": "broken"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory, fixtures_dir):
    base = tmp_path_factory.mktemp("world")
    data = make_dataset(base / "data", corrupt=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        VAE(VAEConfig(ch=32)).save_pretrained(base / "vae")
    return {"base": base, "data": data, "vae": base / "vae", "tok": fixtures_dir / "official-v1-a" / "model"}


def ar_config(world, out: Path, **run) -> dict:
    r = {"out_dir": str(out), "steps": 30, "batch_size": 8, "log_every": 1, "ckpt_every": 0, "seed": 0}
    r.update(run)
    return {"run": r, "data": {"source": "folder", "path": str(world["data"]), "image_size": 32,
                               "mix": {"t2i": 0.7, "edit": 0.2, "text": 0.1}},
            "optim": {"lr": 2e-3, "warmup_steps": 5}, "vae": str(world["vae"]), "tokenizer": str(world["tok"])}


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step is logged twice: {steps}"  # also after a resume
    return {r["step"]: r[key] for r in rows}


def test_ar_losses_fall_and_export_loads_in_the_pipeline(world, tmp_path, one_thread):
    out = tmp_path / "run"
    final = train_ar(from_dict(TrainConfig, ar_config(world, out, export_every=10)), progress=False)
    lm, im = losses(out, "lm_loss"), losses(out, "im_loss")
    first, last = range(1, 6), range(26, 31)
    assert np.mean([lm[s] for s in last]) < 0.7 * np.mean([lm[s] for s in first])
    assert np.mean([im[s] for s in last]) < 0.9 * np.mean([im[s] for s in first])
    got = [losses(out)[s] for s in range(1, 6)]
    assert np.allclose(got, GOLDEN_AR, atol=1e-5, rtol=0), got
    pipe = NextStepPipeline.from_pretrained(final)
    img = pipe("a red square", height=32, width=32, num_inference_steps=3, progress=False).images[0]
    assert img.size == (32, 32)
    assert (out / "checkpoints" / "step_0000030" / "trainer.json").is_file()
    # intermediate exports (for accuracy-vs-training-time curves) are loadable model dirs of their own step
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["step_0000010", "step_0000020"]
    early = NextStepPipeline.from_pretrained(out / "exports" / "step_0000010").model
    a, b = early.state_dict(), pipe.model.state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_exports_sample_with_the_settings_of_the_runs_sample_grids(world, tmp_path, one_thread):
    """Every export carries the grids' sampling settings (generation_config.json), not the 14B model's defaults:
    the final export, loaded as a user would, redraws the step-2 grid exactly with its own defaults."""
    from dataclasses import replace

    from nextstep.config import SamplingConfig
    from nextstep.images import grid_image
    from nextstep.train.ar import GRID_SAMPLING

    out = tmp_path / "g"
    cfg = from_dict(TrainConfig, ar_config(world, out, steps=2, sample_every=2, export_every=1))
    final = train_ar(cfg, progress=False)
    assert GRID_SAMPLING != SamplingConfig.for_format("v1")
    for d in (final, out / "exports" / "step_0000001"):  # and the size the run trained at: others warn
        assert NextStepPipeline.from_pretrained(d).defaults == replace(GRID_SAMPLING, trained_sizes=("32x32",)), d
    pipe = NextStepPipeline.from_pretrained(final)
    again = pipe(cfg.sample_prompts, height=32, width=32, generator=torch.Generator().manual_seed(0), progress=False)
    drawn = np.asarray(Image.open(out / "samples" / "step_0000002.png").convert("RGB"))
    assert np.array_equal(np.asarray(grid_image(again.images).convert("RGB")), drawn)


def test_init_from_keeps_the_checkpoints_loss_weights_unless_the_recipe_sets_them(world, tmp_path):
    """Fine-tuning starts from the loaded model's own config; only the recipe's explicit values override it."""
    from nextstep.config import preset
    from nextstep.model.nextstep import NextStep
    from nextstep.tokenizer import Tokenizer
    from nextstep.train.ar import build_model

    cfg = preset("tiny")
    cfg.lm_loss_weight, cfg.im_loss_weight, cfg.context_noise, cfg.head.batch_mul = 0.05, 2.0, 0.25, 2
    NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0)).save_pretrained(tmp_path / "m")
    tok = Tokenizer.from_pretrained(world["tok"])
    recipe = {**ar_config(world, tmp_path / "unused"), "init_from": str(tmp_path / "m")}
    kept = build_model(from_dict(TrainConfig, recipe), tok).config
    assert (kept.lm_loss_weight, kept.im_loss_weight, kept.context_noise, kept.head.batch_mul) == (0.05, 2.0, 0.25, 2)
    over = build_model(from_dict(TrainConfig, {**recipe, "im_loss_weight": 0.5, "batch_mul": 3}), tok).config
    assert (over.lm_loss_weight, over.im_loss_weight, over.context_noise, over.head.batch_mul) == (0.05, 0.5, 0.25, 3)


def test_parallel_finetune_of_the_adapter_alone_keeps_the_base_and_lowers_its_loss(world, tmp_path, one_thread):
    """The parallel-decoding recipe's shape: init_from a model, parallel_tokens 2, trainable ["image_ahead"]. Every
    base weight is exported exactly as loaded (sequential decoding unchanged), the adapter learns, its loss falls."""
    from nextstep.config import preset
    from nextstep.model.nextstep import NextStep

    cfg = preset("tiny")
    cfg.context_noise = 0.3
    model = NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # a fresh head's output layers are zero (it ignores its condition): a trained head's are not
        for m in model.image_head.modules():
            if isinstance(m, torch.nn.Linear) and not m.weight.any():
                m.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path / "m")
    recipe = {**ar_config(world, tmp_path / "p", steps=24, ema_decay=0.9), "init_from": str(tmp_path / "m"),
              "parallel_tokens": 2, "trainable": ["image_ahead"]}
    recipe["optim"]["lr"] = 1e-2
    train_ar(from_dict(TrainConfig, recipe), progress=False)
    base = load_file(str(tmp_path / "m" / "model.safetensors"))
    tuned = load_file(str(tmp_path / "p" / "final" / "model.safetensors"))
    assert sorted(set(tuned) - set(base)) == ["image_ahead.fc1.bias", "image_ahead.fc1.weight", "image_ahead.fc2.bias",
                                              "image_ahead.fc2.weight", "image_ahead.offsets"]
    for k, v in base.items():
        assert torch.equal(tuned[k], v), k
    assert tuned["image_ahead.fc2.weight"].abs().max() > 0  # starts at zero: it learnt
    loss = losses(tmp_path / "p", "im_loss")
    assert sum(loss[s] for s in range(20, 25)) < sum(loss[s] for s in range(1, 6))
    with pytest.raises(ConfigError, match="trainable: 'image_behind' names no parameter"):
        train_ar(from_dict(TrainConfig, {**recipe, "trainable": ["image_behind"],
                                         "run": {**recipe["run"], "out_dir": str(tmp_path / "q")}}), progress=False)


def test_vae_decoder_only_finetune_keeps_the_encoder(world, tmp_path, one_thread):
    cfg = {"run": {"out_dir": str(tmp_path / "dec"), "steps": 6, "batch_size": 2, "log_every": 1, "ckpt_every": 0,
                   "ema_decay": 0.99},
           "data": {"source": "folder", "path": str(world["data"]), "image_size": 32},
           "optim": {"lr": 2e-3, "warmup_steps": 1}, "holdout": 2, "init_from": str(world["vae"]),
           "train_encoder": False}
    before, after = VAE.from_pretrained(world["vae"]), VAE.from_pretrained(
        train_vae(from_dict(VAETrainConfig, cfg), progress=False))
    for (name, p), q in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(p, q) == name.startswith("encoder."), name  # encoder exact, decoder trained
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(before.encode(x).mode(), after.encode(x).mode())  # cached latents stay valid
    with pytest.raises(ConfigError, match="init_from"):
        from_dict(VAETrainConfig, {"train_encoder": False})


def test_vae_losses_fall_and_report_psnr(world, tmp_path, one_thread):
    cfg = {"run": {"out_dir": str(tmp_path / "vae"), "steps": 40, "batch_size": 4, "log_every": 1,
                   "ckpt_every": 0},
           "data": {"source": "folder", "path": str(world["data"]), "image_size": 32},
           "optim": {"lr": 2e-3, "warmup_steps": 5}, "holdout": 4, "noise_gamma": 0.2}
    final = train_vae(from_dict(VAETrainConfig, cfg), progress=False)
    mse = losses(tmp_path / "vae", "mse")
    assert np.mean([mse[s] for s in range(36, 41)]) < 0.5 * np.mean([mse[s] for s in range(1, 6)])
    ev = json.loads((tmp_path / "vae" / "eval.json").read_text())
    assert ev["images"] == 4 and ev["psnr"] > 10 and 0 < ev["ssim"] <= 1
    assert VAE.from_pretrained(final).config.ch == 32


@pytest.mark.slow  # subprocesses: a run; a killed run and its resumption; 2 processes (DDP, then FSDP2)
def test_two_processes_equal_one_and_kill_and_resume(world, tmp_path, one_thread):
    """2 processes (DDP, FSDP2) give the losses and weights of 1; a run killed -9 after its step-4 checkpoint and
    resumed ends exactly as the uninterrupted one. Then the checkpoint the 2 FSDP2 processes saved at step 4 (each
    holding half of every parameter and of the optimizer state) is resumed by 1 process, here: it holds exactly the
    weights the 2 processes had (their export at step 4), and trains on as they did."""
    cfg = ar_config(world, tmp_path / "one", steps=8, ckpt_every=4, export_every=4)
    cfg["context_noise"] = 0.3  # its noise is drawn per image, so the ranks' split cannot change it
    cfg["parallel_tokens"] = 2  # parallel decoding's rows and parameters (outside the wrapped layers)
    runs = one_two_and_resumed("train", cfg, tmp_path, kill_at=4)
    one = losses(runs["one"])
    w1 = load_file(str(runs["one"] / "final" / "model.safetensors"))
    resumed = losses(runs["resumed"])
    assert sorted(resumed) == list(range(1, 9)) and all(abs(resumed[s] - one[s]) <= 1e-5 for s in one), (one, resumed)
    wr = load_file(str(runs["resumed"] / "final" / "model.safetensors"))
    assert w1.keys() == wr.keys() and all(torch.equal(w1[k], wr[k]) for k in w1)
    for strategy in ("ddp", "fsdp"):
        two = losses(runs[strategy])
        assert one.keys() == two.keys()
        for s in one:
            assert abs(one[s] - two[s]) <= 1e-5, (strategy, s, one[s], two[s])
        w2 = load_file(str(runs[strategy] / "final" / "model.safetensors"))
        assert w1.keys() == w2.keys()
        worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        assert worst <= 1e-5, (strategy, worst)

    saved = runs["fsdp"] / "checkpoints" / "step_0000004"
    assert len(list(saved.glob("*.distcp"))) == 2  # one file per rank: a sharded checkpoint
    alone = tmp_path / "alone"  # the FSDP2 run as it was at step 4, continued on another "cluster"
    shutil.copytree(saved, alone / "checkpoints" / saved.name)
    shutil.copyfile(runs["fsdp"] / "metrics.jsonl", alone / "metrics.jsonl")
    recipe = {**cfg, "run": {**cfg["run"], "out_dir": str(alone), "parallel": "fsdp"}}
    loaded = _resume_ar(world, alone, {**recipe, "run": {**recipe["run"], "steps": 4}})  # no step: export as loaded
    at4, w4 = (load_file(str(d / "model.safetensors")) for d in (loaded, runs["fsdp"] / "exports" / saved.name))
    assert at4.keys() == w4.keys() and all(torch.equal(at4[k], w4[k]) for k in at4)
    final = _resume_ar(world, alone, recipe)  # steps 5 to 8 on one process (model + optimizer state restored)
    ref, got = losses(runs["fsdp"]), losses(alone)
    assert sorted(got) == list(range(1, 9))
    for s in range(5, 9):
        assert abs(got[s] - ref[s]) <= 1e-5, (s, got[s], ref[s])
    w2, wa = (load_file(str(d / "final" / "model.safetensors")) for d in (runs["fsdp"], alone))
    worst = max((wa[k] - w2[k]).abs().max().item() for k in wa)
    assert final == alone / "final" and worst <= 1e-5, worst
    moved = max((wa[k] - at4[k]).abs().max().item() for k in wa)
    assert moved > 1e-3, moved  # steps 5-8 did change the weights (the comparison above is not vacuous)


def vae_recipe(data: Path, out: Path, **run) -> dict:
    """A tiny tokenizer run with the patch discriminator from step 2 and EMA; images only (``image_dataset``), so
    every rank's slice holds as many images whatever the process count."""
    r = {"out_dir": str(out), "steps": 4, "batch_size": 4, "log_every": 1, "ckpt_every": 0, "ema_decay": 0.9}
    return {"run": {**r, **run}, "data": {"source": "folder", "path": str(data), "image_size": 32},
            "optim": {"lr": 2e-3, "warmup_steps": 1}, "holdout": 2, "disc_weight": 0.1, "disc_start": 1}


def image_dataset(root: Path) -> Path:
    """``make_dataset`` without its text-only line."""
    data = make_dataset(root)
    lines = (data / "captions.jsonl").read_text().splitlines()
    (data / "captions.jsonl").write_text("\n".join(x for x in lines if '"text"' not in x))
    return data


def vae_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.slow  # subprocesses: a run; a killed run and its resumption; 2 processes (DDP, then FSDP2)
def test_vae_two_processes_equal_one_and_kill_and_resume(tmp_path):
    """Tokenizer training with the discriminator (always DDP) on 2 processes makes the updates of 1. A bias right
    before a GroupNorm of one channel per group (the 32-channel levels) is nearly cancelled by it: its gradient is
    at rounding level, and Adam turns that into full steps (a step's update is about 5e-4 at lr 5e-4). The
    adversarial term starts at step 3 (its loss at steps 3 and 4, the discriminator's first update before step 4):
    started at step 2, the first steps' rounding grows through it to losses 4e-4 apart by step 4 with oneDNN's AVX2
    kernels (``ONEDNN_MAX_CPU_ISA=AVX2``), though within the bounds with AVX-512's. From step 3 every difference stays
    below 0.3 of its bound with AVX-512, AVX2 (also with ``ATEN_CPU_CAPABILITY=avx2``) and default kernels (Zen 5).

    Killed after its step-3 checkpoint and resumed, a run ends exactly as the uninterrupted one: the discriminator
    and its optimizer are in the atomic checkpoint (named as the plain module names them)."""
    import torch.distributed.checkpoint as dcp

    recipe = vae_recipe(image_dataset(tmp_path / "data"), tmp_path / "one", ckpt_every=3)
    recipe["optim"]["lr"] = 5e-4
    recipe["disc_start"] = 2
    runs = one_two_and_resumed("train-vae", recipe, tmp_path, kill_at=3)
    saved = dcp.FileSystemReader(str(runs["resumed"] / "checkpoints" / "step_0000003")).read_metadata()
    keys = list(saved.state_dict_metadata)
    assert "disc.net.0.weight" in keys and any(k.startswith("disc_optim.state.") for k in keys)
    assert not any("module." in k for k in keys)
    w1 = vae_weights(runs["one"])
    a, b = losses(runs["one"]), losses(runs["resumed"])  # the loss holds the adversarial term from step 3
    assert sorted(b) == list(range(1, 5)) and all(abs(a[s] - b[s]) <= 1e-6 for s in b), (a, b)
    wb = vae_weights(runs["resumed"])
    assert w1.keys() == wb.keys() and all(torch.equal(w1[k], wb[k]) for k in w1)
    for strategy in ("ddp", "fsdp"):
        out = runs[strategy]
        # the gradient norm, a sum of many squares, is the most sensitive
        for key, bound in (("loss", 1e-5), ("mse", 1e-5), ("grad_norm", 1e-4)):
            one, two = losses(runs["one"], key), losses(out, key)
            assert one.keys() == two.keys() and all(abs(one[s] - two[s]) <= bound * abs(one[s]) for s in one), \
                (strategy, key, one, two)
        w2 = vae_weights(out)
        assert w1.keys() == w2.keys()
        for biases, bound in ((False, 5e-5), (True, 1e-3)):
            worst = max((w1[k] - w2[k]).abs().max().item() for k in w1 if k.endswith(".bias") == biases)
            assert worst <= bound, (strategy, biases, worst)


def test_vae_resume_without_the_discriminator_it_trains_is_refused(world, tmp_path, one_thread):
    """A checkpoint that lacks a part the run trains (here written without a discriminator, as the discriminator
    was once kept beside the checkpoint) is a clear error, not a silent fresh start of that part."""
    from nextstep.errors import TrainingError

    recipe = vae_recipe(world["data"], tmp_path / "v", steps=1, ckpt_every=1)
    train_vae(from_dict(VAETrainConfig, {**recipe, "disc_weight": 0.0}), progress=False)
    meta = tmp_path / "v" / "checkpoints" / "step_0000001" / "trainer.json"
    saved = json.loads(meta.read_text())
    saved["config"]["disc_weight"] = 0.1
    meta.write_text(json.dumps(saved))
    with pytest.raises(TrainingError, match="holds no disc, disc_optim state"):
        train_vae(from_dict(VAETrainConfig, {**recipe, "run": {**recipe["run"], "steps": 2}}), resume=True,
                  progress=False)


SHARED_CHECK = """
import sys
from pathlib import Path
from nextstep.train.distributed import init_from_env, shutdown
from nextstep.train.state import check_shared_dir

info = init_from_env()
base = Path(sys.argv[1])
check_shared_dir(base, info)  # one directory: passes
try:  # each rank its own directory, as a node-local disk on each of two nodes would be
    (base / f"node{info.rank}").mkdir()
    check_shared_dir(base / f"node{info.rank}", info)
except RuntimeError as e:
    print(f"rank {info.rank} refused: {e}")
shutdown()
"""


@pytest.mark.slow  # torchrun with 2 processes
def test_out_dir_not_shared_by_all_ranks_is_refused_by_each(tmp_path):
    script = tmp_path / "check.py"
    script.write_text(SHARED_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + (os.getpid() + 7) % 1000), str(script), str(tmp_path)]
    p = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    for rank in (0, 1):
        said = f"rank {rank} refused: run.out_dir {tmp_path / f'node{rank}'} is not shared by all 2 processes: 1 of"
        assert said in p.stdout, p.stdout
    assert not list(tmp_path.rglob(".shared-check-*"))  # the markers are removed


def test_bad_input(world, tmp_path):
    base = ar_config(world, tmp_path / "x", steps=2)
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        train_ar(from_dict(TrainConfig, {**base, "data": {"source": "folder", "path": str(tmp_path / "nope")}}),
                 progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "captions.jsonl").write_text("")
    with pytest.raises(ValueError, match="no samples"):
        train_ar(from_dict(TrainConfig, {**base, "data": {"source": "folder", "path": str(empty)}}), progress=False)
    only_bad = make_dataset(tmp_path / "bad", n=0, corrupt=3)  # three corrupt images and one text line
    with pytest.raises(ValueError, match="no samples of the kinds the mix asks for"):
        train_ar(from_dict(TrainConfig, {**base, "data": {"source": "folder", "path": str(only_bad)}}),
                 progress=False)
    for bad, match in [({"run": {"steps": 0}}, "steps"), ({"optim": {"lr": -1}}, "lr"),
                       ({"data": {"source": "web"}}, "data.source"), ({"data": {"caption_dropout": 1.5}}, "dropout"),
                       ({"run": {"precision": "fp8"}}, "precision"), ({"bogus": 1}, "unknown keys"),
                       ({"run": {"bogus": 1}}, "run.bogus"), ({"data": {"backgrounds": 0.3}}, "shapes source"),
                       ({"data": {"source": "shapes", "backgrounds": 2}}, "data.backgrounds"),
                       ({"data": {"weights": {"counting": 2}}}, "shapes source"),
                       ({"data": {"source": "shapes", "weights": {"bogus": 1}}}, "data.weights.*bogus"),
                       ({"data": {"source": "shapes", "weights": {"counting": -1}}}, "data.weights"),
                       ({"data": {"source": "shapes", "weights": [1, 2]}}, "data.weights")]:
        cfg = {**base, **{k: ({**base.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in bad.items()}}
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, cfg)


def test_precision_auto_trains_in_bf16_where_the_device_has_it(monkeypatch, tmp_path, capsys):
    """"auto" is bf16 (autocast) where the device computes bfloat16 natively and fp32 elsewhere; "bf16" where it is
    emulated (several times slower than fp32 on a CPU with AVX2 only) trains as asked and says so."""
    from nextstep.train import state
    from nextstep.train.config import RunConfig
    from nextstep.train.distributed import DistInfo

    info = DistInfo()
    for native in (True, False):
        monkeypatch.setattr(state, "native_bf16", lambda device, native=native: native)
        auto = RunConfig(out_dir=str(tmp_path / "run"), precision="auto")
        assert state.uses_bf16(auto, info) is native
        assert isinstance(state.training_autocast(auto, info), torch.autocast) is native
        assert state.uses_bf16(RunConfig(precision="bf16"), info) and not state.uses_bf16(RunConfig(), info)
        for precision in ("auto", "bf16"):
            state.start_run(RunConfig(out_dir=str(tmp_path / "run"), precision=precision), info)
            said = capsys.readouterr().err
            assert ("emulates it" in said) is (precision == "bf16" and not native), said
    with pytest.raises(ConfigError, match="'fp32', 'bf16' or 'auto'"):
        RunConfig(precision="fp16")


def test_every_recipe_in_configs_loads():
    """``configs/`` holds the recipes the README runs; each must pass the checks of the command that runs it."""
    from nextstep.rl.config import RLConfig
    from nextstep.train.config import DistillConfig, RereadConfig, load_recipe

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
    assert recipes
    classes = (("shapes-vae", VAETrainConfig), ("distill", DistillConfig), ("shapes-rl", RLConfig),
               ("shapes-reread", RereadConfig))
    for path in recipes:
        cls = next((c for prefix, c in classes if path.name.startswith(prefix)), TrainConfig)
        load_recipe(path, cls)  # raises ConfigError naming the field
    out_dirs = [json.loads(p.read_text())["run"]["out_dir"] for p in recipes]
    assert len(set(out_dirs)) == len(out_dirs), out_dirs  # no two recipes write into one run


def test_corrupt_samples_are_skipped_and_counted(world, tmp_path, capsys):
    out = tmp_path / "c"
    train_ar(from_dict(TrainConfig, ar_config(world, out, steps=1)), progress=True)
    assert "skipped 2 unreadable samples" in capsys.readouterr().err


def test_existing_run_needs_resume(world, tmp_path):
    cfg = from_dict(TrainConfig, ar_config(world, tmp_path / "r", steps=1))
    train_ar(cfg, progress=False)
    with pytest.raises(InputError, match="--resume"):
        train_ar(cfg, progress=False)


def _resume_ar(world, out: Path, recipe: dict | None = None, **run):
    return train_ar(from_dict(TrainConfig, recipe or ar_config(world, out, **run)), resume=True, progress=False)


def test_resume_refuses_changes_to_the_runs_identity_and_names_each(world, tmp_path, capsys, one_thread):
    out = tmp_path / "r"
    train_ar(from_dict(TrainConfig, ar_config(world, out, steps=2)), progress=False)
    saved = (out / "config.json").read_text()
    changed = ar_config(world, out, steps=2, batch_size=4, seed=1)
    changed["optim"]["lr"] = 1e-3
    changed["data"]["mix"] = {"t2i": 1.0}
    changed["im_loss_weight"] = 0.5
    with pytest.raises(ConfigError) as e:
        _resume_ar(world, out, changed)
    msg = str(e.value)
    for line in ("run.batch_size: 8 -> 4", "run.seed: 0 -> 1", "optim.lr: 0.002 -> 0.001",
                 'data.mix.edit: 0.2 -> (absent)', "data.mix.t2i: 0.7 -> 1.0", "im_loss_weight: null -> 0.5"):
        assert f"\n  {line}" in msg, (line, msg)
    assert "run.steps" in msg.split("may change on resume:")[1]  # says what would be accepted
    assert (out / "config.json").read_text() == saved  # a refused resume leaves the run as it was
    with pytest.raises(ConfigError, match=r"run.steps 1 is below the step of the checkpoint.*--steps\) to 2 or more"):
        _resume_ar(world, out, steps=1)

    # allowed: a longer run (the CLI's --steps sets run.steps), other intervals, prompts, wrappers that keep the math
    capsys.readouterr()
    longer = ar_config(world, out, steps=3, log_every=2, activation_checkpointing=True)
    longer["sample_prompts"] = ["a green square"]
    _resume_ar(world, out, longer)
    err = capsys.readouterr().err
    assert "resuming" in err and "from step 2" in err
    assert "run.steps 2 -> 3" in err and "run.log_every 1 -> 2" in err and 'sample_prompts ["a red circle"' in err
    assert "fields that may change on resume: run.out_dir, run.steps, run.log_every" in err
    assert sorted(losses(out)) == [1, 2, 3]
    assert (out / "checkpoints" / "step_0000003").is_dir()


def test_resume_without_a_checkpoint_starts_fresh_and_says_so(world, tmp_path, capsys, one_thread):
    out = tmp_path / "fresh"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')  # killed before a checkpoint
    _resume_ar(world, out, steps=1)
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint in {out / 'checkpoints'}: starting fresh" in err
    assert losses(out)[1] != 9.0 and sorted(losses(out)) == [1]


def test_metrics_have_each_step_once_after_a_resume_from_an_earlier_checkpoint(world, tmp_path, one_thread):
    """A run killed after logging steps 4-6 but before checkpointing step 6 resumes from step 3: the steps it repeats
    replace the old records (same values: the resumed run continues exactly), a torn last line goes too."""
    out = tmp_path / "m"
    train_ar(from_dict(TrainConfig, ar_config(world, out, steps=6, ckpt_every=3)), progress=False)
    before = losses(out)
    shutil.rmtree(out / "checkpoints" / "step_0000006")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')
    _resume_ar(world, out, steps=6, ckpt_every=3)
    after = losses(out)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]
    assert all(abs(after[s] - before[s]) <= 1e-6 for s in after), (before, after)


def test_vae_resume_follows_the_same_rules(world, tmp_path, capsys, one_thread):
    out = tmp_path / "v"

    def recipe(steps: int, **extra) -> VAETrainConfig:
        return from_dict(VAETrainConfig, {
            "run": {"out_dir": str(out), "steps": steps, "batch_size": 2, "log_every": 1, "ckpt_every": 2},
            "data": {"source": "folder", "path": str(world["data"]), "image_size": 32},
            "optim": {"lr": 2e-3, "warmup_steps": 1}, "holdout": 2, **extra})

    train_vae(recipe(4), progress=False)
    before = losses(out)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # killed after logging step 4, before checkpointing it
    with pytest.raises(ConfigError, match="\n  noise_gamma: 0.3 -> 0.1"):
        train_vae(recipe(4, noise_gamma=0.1), resume=True, progress=False)
    capsys.readouterr()
    train_vae(recipe(5), resume=True, progress=False)
    assert "run.steps 4 -> 5" in capsys.readouterr().err
    after = losses(out)
    assert sorted(after) == [1, 2, 3, 4, 5]
    # resumed from step 2: step 3 is redone exactly; step 4 follows an update made under the longer LR schedule
    assert all(abs(after[s] - before[s]) <= 1e-6 for s in (1, 2, 3)) and after[4] != before[4], (before, after)


def test_ema_warms_up_and_tracks_the_weights():
    from nextstep.train.state import EMA

    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, 0.999)
    expect = lin.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            lin.weight.add_(1.0)
        decay = min(0.999, (1 + n) / (10 + n))
        expect = decay * expect + (1 - decay) * lin.weight.detach()
        ema.update(lin)
    assert torch.allclose(ema.weights()["weight"], expect, atol=1e-5)
    # after 30 updates the average sits near the recent weights, not the initial ones
    assert (lin.weight - ema.weights()["weight"]).abs().max() < 10


def test_shards_perceptual_discriminator_and_sample_grids(world, tmp_path):
    """WebDataset-style shards as a source; the VGG perceptual loss with user-supplied weights and the patch
    discriminator switched on mid-run; sample grids from the AR trainer."""
    import io
    import tarfile

    from nextstep.train.losses import VGG16_LAYOUT

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"part-{s}.tar", "w") as tar:
            for i in range(6):
                img = Image.open(world["data"] / f"{s * 6 + i}.png")
                for name, data in ((f"k{s}{i}.png", _png_bytes(img)), (f"k{s}{i}.txt", b"a colored square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    vgg, ch, idx = {}, 3, 0
    g = torch.Generator().manual_seed(0)
    for v in VGG16_LAYOUT:
        if v == "M":
            idx += 1
            continue
        vgg[f"features.{idx}.weight"] = torch.randn(v, ch, 3, 3, generator=g) * 0.05
        vgg[f"features.{idx}.bias"] = torch.zeros(v)
        ch, idx = v, idx + 2
    torch.save(vgg, tmp_path / "vgg.pth")
    cfg = {"run": {"out_dir": str(tmp_path / "v"), "steps": 4, "batch_size": 2, "log_every": 1, "ckpt_every": 0},
           "data": {"source": "shards", "path": str(shards), "image_size": 32}, "holdout": 2,
           "perceptual_weight": 0.1, "perceptual_weights": str(tmp_path / "vgg.pth"), "disc_weight": 0.1,
           "disc_start": 2}
    train_vae(from_dict(VAETrainConfig, cfg), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perceptual"] > 0 for r in rows)
    assert ["g_adv" in r for r in rows] == [False, False, True, True]

    ar = ar_config(world, tmp_path / "a", steps=2, sample_every=2)
    ar["data"] = {"source": "shards", "path": str(shards), "image_size": 32, "mix": {"t2i": 1.0}}
    train_ar(from_dict(TrainConfig, ar), progress=False)
    grid = Image.open(tmp_path / "a" / "samples" / "step_0000002.png")
    assert grid.size == (2 * 32, 32)  # the two default sample prompts side by side


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_activation_checkpointing_gives_the_same_loss_and_gradients(world):
    from nextstep.model.nextstep import NextStep
    from nextstep.model.transformer import DecoderLayer
    from nextstep.train.distributed import apply_activation_checkpointing
    from nextstep.train.state import plain_key

    cfg = from_dict(TrainConfig, ar_config(world, Path("unused"))).model_config()
    a = NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0)).train()
    b = NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0)).train()
    apply_activation_checkpointing(b, (DecoderLayer,))
    ids = torch.tensor([[7, 8, 9, cfg.boi_id] + [cfg.image_placeholder_id] * 4 + [cfg.eoi_id, 11]])
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    la = a.loss(ids, z, generator=torch.Generator().manual_seed(2))
    lb = b.loss(ids, z, generator=torch.Generator().manual_seed(2))
    la.loss.backward()
    lb.loss.backward()
    assert torch.allclose(la.loss, lb.loss, atol=1e-6)
    ga = dict(a.named_parameters())["transformer.layers.0.mlp.up_proj.weight"].grad
    gb = {plain_key(k): p for k, p in b.named_parameters()}["transformer.layers.0.mlp.up_proj.weight"].grad
    assert torch.allclose(ga, gb, atol=1e-6)


def test_plain_state_dict_names_the_owners_weights_as_the_plain_model_does():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from nextstep.train.state import EMA, plain_state_dict

    class Wrapped(torch.nn.Module):  # a loss module: the trained model beside a frozen helper network
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
            self.perceptual = torch.nn.Linear(2, 2)

    w = Wrapped()
    apply_activation_checkpointing(w, check_fn=lambda m: isinstance(m, torch.nn.Linear))
    plain = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in plain_state_dict(w, None, "model").items()}
    assert state.keys() == plain.state_dict().keys()
    plain.load_state_dict(state)  # strict
    ema = EMA(w, 0.5)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(1.0)
    assert torch.equal(plain_state_dict(w, ema, "model")["0.bias"], state["0.bias"])  # EMA weights, not live ones


def test_latent_cache_key_is_stable():
    """Existing caches stay valid: the key of a recipe without ``data.backgrounds`` or ``data.weights`` is the one it
    had before the options existed (pinned), and each option, when used, names another cache."""
    from nextstep.data.shapes import EDIT_TYPES
    from nextstep.train.ar import cache_key

    base = {"vae": "/nonexistent/vae", "tokenizer": "/nonexistent/tok", "data": {"source": "shapes", "seed": 5}}
    assert cache_key(from_dict(TrainConfig, base)) == "fd05a2415769"
    with_bg = {**base, "data": {**base["data"], "backgrounds": 0.2}}
    assert cache_key(from_dict(TrainConfig, with_bg)) != "fd05a2415769"
    as_int = {**base, "data": {**base["data"], "backgrounds": 1}}
    assert cache_key(from_dict(TrainConfig, as_int)) == cache_key(
        from_dict(TrainConfig, {**base, "data": {**base["data"], "backgrounds": 1.0}}))
    for same in ({"counting": 1, "move": 1.0}, {t: 2 for t in EDIT_TYPES}):  # weights that draw uniformly
        assert cache_key(from_dict(TrainConfig, {**base, "data": {**base["data"], "weights": same}})) == "fd05a2415769"
    weighted = {**base, "data": {**base["data"], "weights": {"counting": 2}}}
    assert cache_key(from_dict(TrainConfig, weighted)) not in ("fd05a2415769",
                                                               cache_key(from_dict(TrainConfig, with_bg)))
    assert cache_key(from_dict(TrainConfig, weighted)) == cache_key(
        from_dict(TrainConfig, {**base, "data": {**base["data"], "weights": {"counting": 2.0}}}))
