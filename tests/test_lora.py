"""LoRA adapters (PEFT) on the fixture model: training through `nextstep train` (float and int8 bases), the adapter
files and their base check, fuse / unfuse / scale / several at once, kill -9 and resume, 2 processes against 1, the
CLI's --lora and the server's adapter per request."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from helpers import Wrapped, need, one_two_and_resumed, seeded, wait_until
from nextstep.config import VAEConfig
from nextstep.errors import CheckpointError, ConfigError, InputError
from nextstep.lora import IDENTITY_FILE, PEFT_PREFIX, lora_layers
from nextstep.model.vae import VAE
from nextstep.pipeline import NextStepPipeline, bundled_model_dir
from nextstep.train.ar import train
from nextstep.train.config import TrainConfig, from_dict

pytest.importorskip("peft")
from test_train import losses, make_dataset  # noqa: E402

GEN = dict(height=32, width=32, num_inference_steps=3, progress=False, output_type="pt")


@pytest.fixture(scope="module")
def world(tmp_path_factory, fixture):
    base = tmp_path_factory.mktemp("lora")
    data = make_dataset(base / "data")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        VAE(VAEConfig(ch=32)).save_pretrained(base / "vae")
    return {"base": base, "data": data, "vae": base / "vae", "model": fixture / "model", "fixture": fixture}


def recipe(world, out: Path, targets=("attn", "mlp", "head", "projectors"), **run) -> dict:
    r = {"out_dir": str(out), "steps": 16, "batch_size": 8, "log_every": 1, "ckpt_every": 0, "seed": 0}
    r.update(run)
    return {"run": r, "data": {"source": "folder", "path": str(world["data"]), "image_size": 32,
                               "mix": {"t2i": 0.8, "edit": 0.2}},
            "optim": {"lr": 1e-2, "warmup_steps": 2}, "vae": str(world["vae"]), "init_from": str(world["model"]),
            "lora": {"rank": 4, "alpha": 8, "targets": list(targets)}}


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory):
    """A trained adapter (16 steps, activation checkpointing, all target groups) and its run directory."""
    out = tmp_path_factory.mktemp("run") / "run"
    final = train(from_dict(TrainConfig, recipe(world, out, activation_checkpointing=True, ckpt_every=8)),
                  progress=False)
    return final, out


def _pipe(world, **kw) -> NextStepPipeline:
    return NextStepPipeline.from_pretrained(world["model"], world["fixture"] / "vae", **kw)


def test_training_lowers_the_loss_and_keeps_only_adapters(adapter):
    final, out = adapter
    loss = losses(out)
    assert np.mean([loss[s] for s in (13, 14, 15, 16)]) < 0.7 * np.mean([loss[s] for s in (1, 2, 3, 4)]), loss
    # the checkpoint holds the adapters and their optimizer, nothing of the frozen base
    meta = dcp.FileSystemReader(str(out / "checkpoints" / "step_0000016")).read_metadata().state_dict_metadata
    model_keys = [k for k in meta if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys[:5]
    # the export is PEFT's directory, every tensor an adapter's, named as PeftModel.save_pretrained names them
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       IDENTITY_FILE]
    weights = load_file(str(final / "adapter_model.safetensors"))
    assert len(weights) == 2 * 28 and all(k.startswith(PEFT_PREFIX) and ".lora_" in k for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at 0: it trained
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8


def test_fuse_equals_unfused_unfuse_restores_the_base_and_scale_0_is_the_base(world, adapter):
    pipe = _pipe(world)
    base_state = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base = pipe("a red square", generator=seeded(0), **GEN)
    pipe.load_lora(adapter[0], name="sq")
    unfused = pipe("a red square", generator=seeded(0), **GEN)
    assert (unfused.tokens - base.tokens).abs().max() > 1e-2  # the adapter changes the picture
    pipe.fuse_lora()
    fused = pipe("a red square", generator=seeded(0), **GEN)
    assert (fused.tokens - unfused.tokens).abs().max() <= 1e-3  # merged weights round differently (float32)
    with pytest.raises(InputError, match="fused"):
        pipe.set_lora({"sq": 0.5})
    pipe.unfuse_lora()
    for name, layer in lora_layers(pipe.model).items():  # bit for bit
        assert torch.equal(layer.get_base_layer().weight, base_state[name + ".weight"]), name
    pipe.set_lora({"sq": 0.0})  # scale 0: the base's tokens exactly (the adapter adds 0 * B A x)
    assert torch.equal(pipe("a red square", generator=seeded(0), **GEN).tokens, base.tokens)
    pipe.set_lora(None)  # no adapter active
    assert torch.equal(pipe("a red square", generator=seeded(0), **GEN).tokens, base.tokens)
    pipe.unload_lora()
    assert not lora_layers(pipe.model) and pipe.model.state_dict().keys() == base_state.keys()
    assert all(torch.equal(pipe.model.state_dict()[k], v) for k, v in base_state.items())


def test_files_round_trip_several_adapters_and_names(world, adapter, tmp_path):
    final = adapter[0]
    pipe = _pipe(world, lora=[final])
    assert pipe.loras == {final.name: 1.0}
    with pytest.raises(InputError, match="loaded already"):
        pipe.load_lora(final)
    with pytest.raises(InputError, match="name"):
        pipe.load_lora(final, name="half")  # a torch module attribute
    pipe.load_lora(final, scale=0.5, name="halfway")
    assert pipe.loras == {final.name: 1.0, "halfway": 0.5} and pipe.lora_names == [final.name, "halfway"]
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(final / "adapter_model.safetensors")).items()}
    held = {n: p for n, p in pipe.model.named_parameters() if ".lora_" in n}
    for key, value in saved.items():  # each adapter holds the file's weights
        for name in (final.name, "halfway"):
            part = key.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}.")
            assert torch.equal(held[part], value), part
    # two copies at scales 1 + 0.5 equal one at 1.5 (to float rounding)
    both = pipe("a red square", generator=seeded(0), **GEN).tokens
    pipe.set_lora({"halfway": 1.5})
    assert (pipe("a red square", generator=seeded(0), **GEN).tokens - both).abs().max() <= 1e-4
    with pytest.raises(InputError, match="no LoRA adapter named 'nope'"):
        pipe.set_lora("nope")
    # every run's adapter is OUT/final: another run's gets its run's name, a third of both names a number
    for run in ("other-run", "x/other-run"):
        shutil.copytree(final, tmp_path / run / final.name)
    pipe.load_lora(tmp_path / "other-run" / final.name).load_lora(tmp_path / "x" / "other-run" / final.name)
    assert pipe.lora_names == [final.name, "halfway", f"other-run-{final.name}", f"{final.name}-2"]


def test_an_adapter_of_another_base_is_refused(adapter):
    if bundled_model_dir() is None:
        pytest.skip("no bundled model")
    pipe = NextStepPipeline.from_pretrained()
    with pytest.raises(CheckpointError, match="belongs to another model"):
        pipe.load_lora(adapter[0])
    assert not lora_layers(pipe.model)


def test_quantized_base_trains_and_samples_unfused(world, tmp_path):
    cfg = recipe(world, tmp_path / "q", targets=("attn", "mlp", "head"), steps=8)
    cfg["quantize"] = "int8"
    final = train(from_dict(TrainConfig, cfg), progress=False)
    loss = losses(tmp_path / "q")
    assert loss[8] < 0.8 * loss[1], loss
    assert json.loads((final / IDENTITY_FILE).read_text())["quantized"] == "int8"
    pipe = _pipe(world, quantize="int8", lora=final)
    base = _pipe(world, quantize="int8")
    a = pipe("a red square", generator=seeded(0), **GEN).tokens
    assert (a - base("a red square", generator=seeded(0), **GEN).tokens).abs().max() > 1e-2
    with pytest.raises(InputError, match="quantized"):
        pipe.fuse_lora()
    _pipe(world, lora=final)  # the float base is the same model: it loads there too


def test_recipe_checks(world, tmp_path):
    cfg = recipe(world, tmp_path / "x")
    for change, match in ((lambda c: c.pop("init_from"), "init_from"),
                          (lambda c: c["lora"].update(targets=["attn", "everything"]), "lora.targets"),
                          (lambda c: c["lora"].update(rank=0), "lora.rank"),
                          (lambda c: c["lora"].update(replay_targets="model"), "lora.replay_targets"),
                          (lambda c: c["lora"].update(replay_weight=0), "lora.replay_weight"),
                          (lambda c: c.update(context_noise=0.5), "context_noise"),
                          (lambda c: (c.pop("lora"), c.update(quantize="int8")), "quantize")):
        bad = json.loads(json.dumps(cfg))
        change(bad)
        if "init_from" not in bad:
            bad["tokenizer"] = str(world["model"])
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, bad)


def replay_data(root: Path) -> Path:
    """make_dataset's samples with every other line (t2i, edits, the text) marked "replay": true."""
    data = make_dataset(root)
    lines = [json.loads(x) for x in (data / "captions.jsonl").read_text().splitlines()]
    for i, x in enumerate(lines):
        if i % 2:
            x["replay"] = True
    (data / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return data


def test_replayed_images_take_the_base_velocity(world, tmp_path):
    """``NextStep.loss(base_targets=, base=)``, as ``"replay_targets": "base"`` trains: a replayed image's flow target
    is the base's velocity at the same point, so with fresh adapters (B = 0) its loss and gradient are zero and the
    other images keep the data's loss; ``adapters_disabled`` computes the base exactly and gives the adapters back."""
    from nextstep import lora
    from nextstep.data.sequences import build_example, collate, encode_samples
    from nextstep.data.sources import FolderSource
    from nextstep.model.nextstep import NextStep
    from nextstep.tokenizer import Tokenizer

    records, _ = encode_samples(FolderSource(replay_data(tmp_path / "d")), VAE.from_pretrained(world["vae"]),
                                [(32, 32)], progress=False)
    tok, plain, model = (Tokenizer.from_pretrained(world["model"]), NextStep.from_pretrained(world["model"]),
                         NextStep.from_pretrained(world["model"]))
    lora.inject(lora.lora_config(4, 8, 0.0, ["attn", "mlp", "head", "projectors"], model), model)
    model.config.lm_loss_weight = 0.0
    picks = [i for i, r in enumerate(records) if r.kind != "text"][:8]
    batch = collate([build_example(records[i], tok, model.config.patch_size, i, 0.0, 0.0) for i in picks],
                    tok.special.pad, picks)
    assert batch.replayed is not None and 0 < int(batch.replayed.sum()) < len(batch.latents)
    assert {records[i].kind for i in picks} == {"t2i", "edit"}
    base = lambda: lora.adapters_disabled(model)  # noqa: E731

    def loss(marked=None, mask=None):
        gens = [torch.Generator().manual_seed(s) for s in batch.image_seeds]
        return model.loss(batch.input_ids, batch.latents, attention_mask=batch.attention_mask,
                          image_loss_mask=batch.image_loss_mask if mask is None else mask, generator=gens,
                          **({} if marked is None else {"base_targets": marked, "base": base}))

    mixed = loss(batch.replayed)
    others = loss(mask=batch.image_loss_mask * ~batch.replayed)  # the data's loss on the images not replayed
    assert mixed.im_loss > 0 and abs(mixed.im_loss * mixed.im_count - others.im_loss * others.im_count) <= 1e-6
    # none marked: the data's loss, and the base still computed (under FSDP2 every rank makes the same calls,
    # whether or not its share of the batch holds a replayed image)
    entered = []

    def counted():
        entered.append(1)
        return base()

    gens = [torch.Generator().manual_seed(s) for s in batch.image_seeds]
    none = model.loss(batch.input_ids, batch.latents, attention_mask=batch.attention_mask,
                      image_loss_mask=batch.image_loss_mask, generator=gens,
                      base_targets=torch.zeros(len(batch.latents), dtype=torch.bool), base=counted)
    assert none.im_loss == loss().im_loss and len(entered) >= 2  # the backbone's forward and the head's
    every = loss(torch.ones(len(batch.latents), dtype=torch.bool))
    every.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_" in n]
    assert every.im_loss == 0 and grads and all(g is None or g.abs().max() == 0 for g in grads)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask = batch.input_ids[:1], batch.attention_mask[:1]
    with torch.no_grad():
        adapted = model.forward(model.embed(ids, batch.latents[:1]), attention_mask=mask)
        with lora.adapters_disabled(model):
            inside = model.forward(model.embed(ids, batch.latents[:1]), attention_mask=mask)
        after = model.forward(model.embed(ids, batch.latents[:1]), attention_mask=mask)
        want = plain.forward(plain.embed(ids, batch.latents[:1]), attention_mask=mask)
    assert torch.equal(inside, want) and torch.equal(after, adapted) and (adapted - want).abs().max() > 1e-3
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert loss(torch.ones(len(batch.latents), dtype=torch.bool)).im_loss > 1e-6  # the adapter now departs


def test_replay_targets_base_in_a_run(world, tmp_path):
    """The recipe's ``"replay_targets": "base"``: the run's first loss counts the replayed images at zero (the
    adapters start at the base), ``replay_weight`` weighs them; a dataset with no replayed sample is refused."""
    cfg = recipe(world, tmp_path / "data", steps=2)
    cfg["data"]["path"] = str(replay_data(tmp_path / "replay"))
    train(from_dict(TrainConfig, cfg), progress=False)
    cfg["run"]["out_dir"], cfg["lora"]["replay_targets"] = str(tmp_path / "base"), "base"
    train(from_dict(TrainConfig, cfg), progress=False)
    cfg["run"]["out_dir"], cfg["lora"]["replay_weight"] = str(tmp_path / "heavy"), 1000.0
    train(from_dict(TrainConfig, cfg), progress=False)
    data, base, heavy = (json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0])
                         for d in ("data", "base", "heavy"))
    assert 0 < base["im_loss"] < 0.75 * data["im_loss"], (base, data)
    # replay_weight weighs the replayed images' rows (zero loss at the start) in the mean: the rest's share shrinks
    assert 0 < heavy["im_loss"] < base["im_loss"] / 50, (heavy, base)
    cfg = recipe(world, tmp_path / "none", steps=1)
    cfg["lora"]["replay_targets"] = "base"
    with pytest.raises(ConfigError, match="replay"):
        train(from_dict(TrainConfig, cfg), progress=False)


@pytest.mark.slow  # subprocesses: a run; a killed run and its resumption; 2 processes (DDP, then FSDP2)
def test_two_processes_equal_one_and_kill_and_resume(world, tmp_path):
    """With half the samples replayed towards the base's velocities (the base's forward inside the wrapped one)."""
    cfg = recipe(world, tmp_path / "one", steps=6, ckpt_every=3, activation_checkpointing=True)
    cfg["data"]["path"], cfg["lora"]["replay_targets"] = str(replay_data(tmp_path / "replay")), "base"
    runs = one_two_and_resumed("train", cfg, tmp_path, kill_at=3)
    one = losses(runs["one"])

    def adapter(name: str) -> dict[str, torch.Tensor]:
        return load_file(str(runs[name] / "final" / "adapter_model.safetensors"))

    w1 = adapter("one")
    resumed, wr = losses(runs["resumed"]), adapter("resumed")
    assert sorted(resumed) == list(range(1, 7)) and all(abs(one[s] - resumed[s]) <= 1e-5 for s in one), (one, resumed)
    assert w1.keys() == wr.keys() and all(torch.equal(w1[k], wr[k]) for k in w1)
    for strategy in ("ddp", "fsdp"):
        two = losses(runs[strategy])
        assert one.keys() == two.keys()
        for s in one:
            assert abs(one[s] - two[s]) <= 1e-5, (strategy, s, one[s], two[s])
        # Adam scales each weight's step by its gradient's size: where a gradient is tiny (an A whose B is still near
        # zero, replayed images near the base), summation order moves the weight by up to ~1e-4 of its size (7.3e-4
        # with oneDNN's AVX2 kernels: ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU)
        w2 = adapter(strategy)
        assert w1.keys() == w2.keys()
        assert max(((w1[k] - w2[k]).abs().max() / (1e-2 + w1[k].abs().max())).item() for k in w1) <= 1.5e-3, strategy


def test_cli_lora_flag(world, adapter, tmp_path):
    from nextstep.cli import main

    common = ["--model", str(world["model"]), "--vae", str(world["fixture"] / "vae"), "--size", "32x32",
              "--steps", "2", "--seed", "3", "--quiet"]
    assert main(["generate", "a red square", "-o", str(tmp_path / "base.png"), *common]) == 0
    assert main(["generate", "a red square", "-o", str(tmp_path / "a.png"), *common,
                 "--lora", f"{adapter[0]}:1.0"]) == 0
    assert main(["generate", "a red square", "-o", str(tmp_path / "z.png"), *common, "--lora", f"{adapter[0]}:0"]) == 0
    from PIL import Image

    px = {n: np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("base", "a", "z")}
    assert np.array_equal(px["z"], px["base"]) and np.abs(px["a"] - px["base"]).max() > 0
    assert main(["generate", "x", "-o", str(tmp_path / "m.png"), *common, "--lora", str(tmp_path / "missing")]) == 2


def test_server_picks_the_adapter_per_request_and_batches_by_it(world, adapter):
    need("fastapi", "pip install -e '.[serve]'")
    need("httpx", "pip install -e '.[dev]'")
    from helpers import local
    from nextstep.serve.routes import create_app

    pipe = _pipe(world)
    pipe.load_lora(adapter[0], name="squares")
    pipe.set_lora(None)

    class Recording(Wrapped):
        def __init__(self, pipe):
            super().__init__(pipe)
            self.calls, self.release = [], threading.Event()

        def _generate(self, prompt, **kwargs):
            self.calls.append((prompt, self.pipe.loras))
            if len(self.calls) == 1:
                assert self.release.wait(30)
            return self.pipe._generate(prompt, **kwargs)

    rec = Recording(pipe)
    body = {"size": "32x32", "steps": 2, "seed": 5}
    with local(create_app(rec, queue_size=6, batch_wait_s=0)) as c, ThreadPoolExecutor(6) as pool:
        assert c.get("/health").json()["model"]["loras"] == ["squares"]
        r = c.post("/v1/images/generations", json={"prompt": "a", "lora": "nope", **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora"
        blocker = pool.submit(c.post, "/v1/images/generations", json={"prompt": "blocker", **body, "size": "16x16"})
        wait_until(lambda: rec.calls, what="the first call")
        worker = c.app.state.worker
        sent = []
        for i, lora in enumerate(["squares", None, "squares", None]):
            extra = {"lora": lora} if lora else {}
            sent.append(pool.submit(c.post, "/v1/images/generations", json={"prompt": f"p{i}", **body, **extra}))
            wait_until(lambda n=i + 1: worker.waiting == n, what="queued")
        rec.release.set()
        answers = [f.result() for f in [blocker, *sent]]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    calls = rec.calls[1:]
    assert sorted((sorted(p) if isinstance(p, list) else [p], tuple(a)) for p, a in calls) == [
        (["p0", "p2"], ("squares",)), (["p1", "p3"], ())]
    alone = _pipe(world, lora=adapter[0])
    ref = alone("p0", generator=seeded(5), height=32, width=32, num_inference_steps=2, progress=False)
    import base64
    import io

    from PIL import Image

    got = Image.open(io.BytesIO(base64.b64decode(answers[1].json()["data"][0]["b64_json"])))
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(ref.images[0]).astype(int)).max()
    assert diff <= 2, diff  # batched with p2: float rounding only (BATCH_TOLERANCE in test_serve_batching)


def test_generate_many_records_its_adapters(adapter, world, tmp_path, capsys):
    """A generate-many run with --lora records the adapter (its files and scale): resuming with another scale, or
    without it, is refused before anything is drawn."""
    from nextstep.cli import main

    final, _ = adapter
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    out = tmp_path / "run"
    args = ["generate-many", str(prompts), "--out", str(out), "-n", "1", "--size", "32x32", "--steps", "2", "--quiet",
            "--model", str(world["model"]), "--vae", str(world["fixture"] / "vae")]
    assert main([*args, "--lora", f"{final}:0.5"]) == 0
    for other in (["--lora", f"{final}:1.0"], []):
        capsys.readouterr()
        assert main([*args, *other]) == 2
        assert "holds another run" in capsys.readouterr().err
