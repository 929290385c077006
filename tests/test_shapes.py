"""The shapes world and its evaluator: determinism, exact scoring of ground truth (clean and perturbed), metrics
that can fail, caption variety, other image sizes, and the benchmark end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nextstep.data import shapes as S
from nextstep.data.shapes.scene import _apart, _gap, _inside
from nextstep.eval import shapes as E

N_GT = 120  # ground-truth samples per category / edit type at 64 px


def _perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a decoder might do: a 3x3 box blur, then Gaussian noise of sigma 8/255."""
    blurred = np.asarray(image.filter(ImageFilter.BoxBlur(1)), dtype=np.float64)
    noisy = blurred + rng.normal(0.0, 8.0, size=blurred.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def _t2i(category: str, n: int, size: int = 64, seed: int = 0):
    return [S.generate_t2i(category, np.random.default_rng([seed, k]), size) for k in range(n)]


def _edits(edit_type: str, n: int, size: int = 64, seed: int = 0):
    return [S.generate_edit(edit_type, np.random.default_rng([seed, k]), size) for k in range(n)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _same_item(a: dict, b: dict) -> bool:
    if a["kind"] != b["kind"]:
        return False
    keys = ("image",) if a["kind"] == "t2i" else ("source", "target")
    text = "caption" if a["kind"] == "t2i" else "instruction"
    return a[text] == b[text] and all(np.array_equal(_pixels(a[k]), _pixels(b[k])) for k in keys)


# -- determinism -------------------------------------------------------------------------------------------------


def test_dataset_is_a_pure_function_of_seed_and_index():
    a, b = S.ShapesDataset(40, seed=5), S.ShapesDataset(40, seed=5)
    later = [b[i] for i in reversed(range(40))][::-1]  # drawn in another order
    assert all(_same_item(a[i], later[i]) for i in range(40))
    assert not _same_item(a[3], a[4])
    other = S.ShapesDataset(40, seed=6)
    assert sum(_same_item(a[i], other[i]) for i in range(40)) <= 2


def test_dataset_items_mix_and_errors():
    ds = S.ShapesDataset(300, seed=0)
    kinds = [ds[i]["kind"] for i in range(300)]
    assert 0.7 < kinds.count("t2i") / 300 < 0.9
    item = S.ShapesDataset(5, seed=1, size=96, mix={"edit": 1.0})[2]
    assert item["kind"] == "edit" and item["source"].size == item["target"].size == (96, 96)
    assert item["source"].mode == "RGB" and isinstance(item["instruction"], str)
    item = S.ShapesDataset(5, seed=1, mix={"t2i": 1.0})[0]
    assert item["kind"] == "t2i" and item["image"].size == (64, 64) and item["caption"]
    with pytest.raises(IndexError):
        ds[300]
    with pytest.raises(ValueError, match="mix"):
        S.ShapesDataset(5, seed=0, mix={"text": 1.0})
    with pytest.raises(ValueError, match="mix"):
        S.ShapesDataset(5, seed=0, mix={"t2i": 0.0})
    with pytest.raises(ValueError, match="size"):
        S.ShapesDataset(5, seed=0, size=16)


def test_dataset_backgrounds_change_only_the_picked_t2i_backgrounds():
    plain, mixed = S.ShapesDataset(80, seed=2), S.ShapesDataset(80, seed=2, backgrounds=0.5)
    changed = 0
    for i in range(80):
        a, b = plain[i], mixed[i]
        if a["kind"] == "edit" or _same_item(a, b):
            assert _same_item(a, b)  # edits never change
            continue
        changed += 1
        bg = re.fullmatch(r".* on an? (black|gray) background", b["caption"]).group(1)
        assert b["caption"] == a["caption"].removesuffix(" on a white background") + f" on a {bg} background"
        pa, pb = _pixels(a["image"]), _pixels(b["image"])
        white = (pa == 255).all(-1)
        assert white.mean() > 0.5  # the objects leave most of the canvas to the background
        assert (pb[white] == S.BACKGROUND_COLORS[bg]).all() and np.array_equal(pb[~white], pa[~white])
        assert E.analyze(b["image"]).background == bg
    n_t2i = sum(plain[i]["kind"] == "t2i" for i in range(80))
    assert 0.3 * n_t2i < changed < 0.7 * n_t2i
    every = S.ShapesDataset(30, seed=2, backgrounds=1.0)
    assert all(not it["caption"].endswith("white background") and (_pixels(it["image"])[0, 0] != 255).all()
               for it in (every[i] for i in range(30)) if it["kind"] == "t2i")
    for bad in (1.5, -0.1, "0.5", None, True):
        with pytest.raises(ValueError, match="backgrounds"):
            S.ShapesDataset(5, seed=0, backgrounds=bad)


def _plural(caption: str) -> bool:
    """Only counting captions name shapes in the plural."""
    return re.search(r"\b(circle|square|triangle)s\b", caption) is not None


def test_dataset_weights_pick_categories_and_edit_types():
    plain = S.ShapesDataset(60, seed=4)
    # the samples of the versions before weights existed (pinned), with no weights or with weights of 1
    assert [plain[i].get("caption", plain[i].get("instruction")) for i in range(6)] == [
        "give it a gray background", "one circle and one triangle", "a circle together with a triangle",
        "a square placed right of a triangle", "make the background black", "a circle beneath a square"]
    assert S.data_weights({"counting": 2, "colors": 1, "move": 1, **{t: 3 for t in S.EDIT_TYPES}}) == {"counting": 2.0}
    for same in ({}, {"move": 1, "counting": 1.0}, {c: 2 for c in S.CATEGORIES}):
        other = S.ShapesDataset(60, seed=4, weights=same)
        assert all(_same_item(plain[i], other[i]) for i in range(60))
    t2i = [i for i in range(60) if plain[i]["kind"] == "t2i"]
    edits = [i for i in range(60) if plain[i]["kind"] == "edit"]
    assert len(t2i) > 10 and len(edits) > 5
    edits_weighted, t2i_weighted = (S.ShapesDataset(60, seed=4, weights=w) for w in ({"move": 3}, {"counting": 3}))
    assert all(_same_item(plain[i], edits_weighted[i]) for i in t2i)  # edit weights leave t2i samples alone
    assert all(_same_item(plain[i], t2i_weighted[i]) for i in edits)  # and category weights the edits
    assert not all(_same_item(plain[i], edits_weighted[i]) for i in edits)
    assert not all(_same_item(plain[i], t2i_weighted[i]) for i in t2i)
    counting_only = {c: 0 for c in S.CATEGORIES if c != "counting"}
    ds = S.ShapesDataset(40, seed=4, mix={"t2i": 1.0}, weights=counting_only)
    for i in range(40):
        found = E.analyze(ds[i]["image"]).objects
        assert len(found) >= 2 and len({(d.shape, d.color) for d in found}) == 1  # n objects of one kind
        assert _plural(ds[i]["caption"])
    ds = S.ShapesDataset(30, seed=4, mix={"edit": 1.0}, weights={t: 0 for t in S.EDIT_TYPES if t != "background"})
    for i in range(30):
        source, target = E.analyze(ds[i]["source"]), E.analyze(ds[i]["target"])
        assert source.background == "white" and target.background in S.EDIT_BACKGROUNDS
        assert source.objects == target.objects
    heavy = S.ShapesDataset(600, seed=4, mix={"t2i": 1.0}, weights={"counting": 5.0})
    share = sum(_plural(heavy[i]["caption"]) for i in range(600)) / 600
    assert 0.4 < share < 0.6  # 5 / 10, where uniform would give 1/6
    for bad in ({"bogus": 1}, {"counting": -1}, {"counting": "2"}, {"counting": True}, {"counting": float("nan")},
                {"counting": float("inf")}, {"counting": 10**400}, {c: 0 for c in S.CATEGORIES}, ["counting"], []):
        with pytest.raises(ValueError, match="weights"):
            S.ShapesDataset(5, seed=0, weights=bad)


def test_evaluation_sets_are_fixed():
    assert S.prompt_set("counting", 10, seed=3) == S.prompt_set("counting", 10, seed=3)
    assert S.prompt_set("counting", 10, seed=3) != S.prompt_set("counting", 10, seed=4)
    first, again = S.edit_set(12, seed=3), S.edit_set(12, seed=3)
    assert [(i, s) for _, i, s in first] == [(i, s) for _, i, s in again]
    assert all(np.array_equal(_pixels(x), _pixels(y)) for (x, _, _), (y, _, _) in zip(first, again))
    assert {spec["edit"] for _, _, spec in first} == set(S.EDIT_TYPES)
    with pytest.raises(ValueError, match="category"):
        S.prompt_set("colour", 3, seed=0)


def test_render_is_exact_and_scenes_are_valid():
    scene = S.Scene((S.Obj("square", "red", 16.0, 16.0, 12), S.Obj("circle", "blue", 44.0, 40.0, 14)), "gray", 64)
    arr = _pixels(S.render(scene))
    assert arr.shape == (64, 64, 3)
    assert set(map(tuple, arr.reshape(-1, 3))) == {S.OBJECT_COLORS["red"], S.OBJECT_COLORS["blue"],
                                                   S.BACKGROUND_COLORS["gray"]}
    assert (arr[10:22, 10:22] == S.OBJECT_COLORS["red"]).all()
    assert S.object_bbox(scene.objects[0], 64) == (10, 10, 22, 22)
    with pytest.raises(ValueError, match="color"):
        S.Obj("square", "pink", 10, 10, 10)
    for category in S.CATEGORIES:  # objects inside the canvas and apart
        for _, _, scene in _t2i(category, 20):
            for i, a in enumerate(scene.objects):
                assert _inside(a, 64)
                assert all(_apart(a, b, _gap(64)) for b in scene.objects[i + 1:])


# -- ground truth is scored (almost) perfectly -------------------------------------------------------------------


def _t2i_accuracy(samples, perturb: bool, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    ok = 0
    for _, spec, scene in samples:
        image = S.render(scene)
        ok += E.check(spec, E.analyze(_perturb(image, rng) if perturb else image))
    return 100.0 * ok / len(samples)


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_ground_truth_images_pass(category):
    samples = _t2i(category, N_GT)
    assert _t2i_accuracy(samples, perturb=False) >= 99.0
    assert _t2i_accuracy(samples, perturb=True) >= 97.0


def test_analyze_reads_objects_exactly():
    objs = (S.Obj("triangle", "green", 14.0, 14.0, 16), S.Obj("circle", "orange", 45.0, 20.0, 15),
            S.Obj("square", "purple", 30.0, 48.0, 13))
    for background in S.BACKGROUND_COLORS:
        scene = S.Scene(objs, background, 64)
        result = E.analyze(S.render(scene))
        assert result.background == background and (result.width, result.height) == (64, 64)
        got = sorted((d.shape, d.color, d.bbox, d.area) for d in result.objects)
        want = sorted((o.shape, o.color, S.object_bbox(o, 64), int(S.object_mask(o, 64).sum())) for o in objs)
        assert got == want


@pytest.mark.parametrize("edit_type", S.EDIT_TYPES)
def test_ground_truth_edits_pass_and_unedited_sources_fail(edit_type):
    rng = np.random.default_rng(1)
    success, identity, perturbed = 0, 0, 0
    for source, _, target, spec in _edits(edit_type, N_GT):
        src, tgt = S.render(source), S.render(target)
        ok, value = E.check_edit(spec, src, tgt)
        success += ok
        assert value == math.inf  # nothing outside the edited region changed
        identity += E.check_edit(spec, src, src)[0]
        perturbed += E.check_edit(spec, src, _perturb(tgt, rng))[0]
    assert success / N_GT >= 0.99
    assert perturbed / N_GT >= 0.97
    assert identity / N_GT <= 0.01  # the metric can fail: doing nothing is not an edit


def test_edit_spec_names_the_change():
    _, instruction, _, spec = _edits("move", 1)[0]
    before, after = spec["source_object"], spec["target_object"]
    assert (before["shape"], before["color"]) == (after["shape"], after["color"])
    x0, y0, x1, y1 = spec["source_bbox"]
    assert (x0 + x1) / 2 == before["cx"] and (y0 + y1) / 2 == before["cy"]
    assert before["shape"] in instruction and spec["background"] == "white"
    _, _, _, spec = _edits("background", 1)[0]
    assert spec["background"] in S.EDIT_BACKGROUNDS and spec["source_bbox"] is None


# -- wrong images fail -------------------------------------------------------------------------------------------


def _recolored(scene: S.Scene, i: int, color: str) -> S.Scene:
    objs = list(scene.objects)
    objs[i] = S.Obj(objs[i].shape, color, objs[i].cx, objs[i].cy, objs[i].size)
    return S.Scene(tuple(objs), scene.background, scene.size)


def _other(options, current):
    return next(o for o in options if o != current)


def test_wrong_images_fail():
    blank = E.analyze(Image.new("RGB", (64, 64), "white"))
    for category in S.CATEGORIES:
        for _, spec, scene in _t2i(category, 20, seed=2):
            assert not E.check(spec, blank)
            dropped = S.Scene(scene.objects[1:], scene.background, 64)  # one object missing
            assert not E.check(spec, E.analyze(S.render(dropped)))
    for _, spec, scene in _t2i("single_object", 30, seed=3):
        wrong = _recolored(scene, 0, _other(S.COLORS, scene.objects[0].color))
        assert not E.check(spec, E.analyze(S.render(wrong)))
        o = scene.objects[0]
        reshaped = S.Scene((S.Obj(_other(S.SHAPES, o.shape), o.color, o.cx, o.cy, o.size),), "white", 64)
        assert not E.check(spec, E.analyze(S.render(reshaped)))
    for _, spec, scene in _t2i("position", 30, seed=3):
        flipped = {**spec, "relation": {"left of": "right of", "right of": "left of", "above": "below",
                                        "below": "above"}[spec["relation"]]}
        assert E.check(spec, E.analyze(S.render(scene))) and not E.check(flipped, E.analyze(S.render(scene)))
    for _, spec, scene in _t2i("color_attribution", 30, seed=3):
        a, b = scene.objects
        swapped = _recolored(_recolored(scene, 0, b.color), 1, a.color)
        assert not E.check(spec, E.analyze(S.render(swapped)))
    # Each spec, scored on another sample's image of the same category, mostly fails.
    samples = _t2i("single_object", 60, seed=4)
    cross = sum(E.check(samples[i][1], E.analyze(S.render(samples[i - 1][2]))) for i in range(60))
    assert cross <= 12


def test_wrong_edits_fail():
    for source, _, target, spec in _edits("recolor", 30, seed=5):
        changed = spec["target_object"]
        i = next(k for k, o in enumerate(target.objects) if (o.shape, o.color) == (changed["shape"], changed["color"]))
        taken = {o.color for o in target.objects if o.shape == changed["shape"]} | {spec["source_object"]["color"]}
        wrong = _recolored(target, i, next(c for c in S.COLORS if c not in taken))
        assert not E.check_edit(spec, S.render(source), S.render(wrong))[0]
    for source, _, target, spec in _edits("background", 12, seed=5):
        wrong = S.Scene(target.objects, _other(S.EDIT_BACKGROUNDS, target.background), 64)
        assert not E.check_edit(spec, S.render(source), S.render(wrong))[0]


def test_psnr_outside_measures_preservation():
    source, _, target, spec = _edits("recolor", 1, seed=6)[0]
    src, tgt = S.render(source), np.array(S.render(target))
    band = tgt[:8]  # darken the background of a band across the top: the edit still succeeds, preservation drops
    band[(band == 255).all(axis=-1)] = 215
    ok, value = E.check_edit(spec, src, Image.fromarray(tgt))
    assert ok and 15 < value < 35
    with pytest.raises(ValueError, match="source"):
        E.check_edit(spec, src, src.resize((32, 32)))


# -- captions ----------------------------------------------------------------------------------------------------

_WORDS = {
    "C": S.COLORS + S.EDIT_BACKGROUNDS + ("white",),
    "S": tuple(s + "s" for s in S.SHAPES) + S.SHAPES,
    "N": tuple(S.COUNT_WORDS.values()),
    "R": tuple(p for ps in S.RELATION_PHRASES.values() for p in ps),
    "D": tuple(p for ps in S.DIRECTION_PHRASES.values() for p in ps),
}


def _skeleton(text: str) -> str:
    """The wording with colours, shapes, counts, relations and directions blanked out."""
    for tag in ("R", "D", "C", "S", "N"):
        words = sorted(_WORDS[tag], key=len, reverse=True)
        text = re.sub(r"\b(" + "|".join(map(re.escape, words)) + r")\b", tag, text)
    return re.sub(r"\b(a|an)\b", "A", text)


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_caption_wording_varies(category):
    captions = [c for c, _, _ in _t2i(category, 100, seed=7)]
    assert len({_skeleton(c) for c in captions}) >= 3
    assert all(c == c.strip() and "  " not in c and " a a" not in c for c in captions)
    assert not any(re.search(r"\ba [aeiou]", c) for c in captions)  # "an orange", never "a orange"


def test_caption_plurals_and_instruction_variety():
    for caption, spec, _ in _t2i("counting", 30, seed=8):
        want = spec["objects"][0]
        assert f"{S.COUNT_WORDS[len(spec['objects'])]} {want['color']} {want['shape']}s" in caption
    for edit_type in S.EDIT_TYPES:
        instructions = [i for _, i, _, _ in _edits(edit_type, 60, seed=8)]
        assert len({_skeleton(i) for i in instructions}) >= 3, edit_type


# -- other sizes -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 128])
def test_other_sizes(size):
    for category in S.CATEGORIES:
        samples = _t2i(category, 25, size=size, seed=9)
        assert all(scene.size == size for _, _, scene in samples)
        assert _t2i_accuracy(samples, perturb=False) >= 99.0, category
        assert _t2i_accuracy(samples, perturb=True) >= 96.0, category
    for edit_type in S.EDIT_TYPES:
        for source, _, target, spec in _edits(edit_type, 8, size=size, seed=9):
            src = S.render(source)
            assert E.check_edit(spec, src, S.render(target)) == (True, math.inf), edit_type
            assert not E.check_edit(spec, src, src)[0], edit_type


# -- benchmark ---------------------------------------------------------------------------------------------------


def _oracle(n: int, seed: int, size: int):
    """A "model" that draws a correct scene for every evaluation caption."""
    specs = {c: s for cat in S.CATEGORIES for c, s in S.prompt_set(cat, n, seed, size)}
    rng = np.random.default_rng(0)
    return lambda captions: [S.render(S.scene_for_spec(specs[c], rng, size)) for c in captions]


def test_describe_says_what_the_evaluator_read():
    scene = S.Scene((S.Obj("circle", "red", 16, 14, 14), S.Obj("square", "blue", 44, 46, 14)), "black")
    assert E.describe(E.analyze(S.render(scene))) == "red circle, blue square on black"
    pixels = np.array(S.render(S.Scene(scene.objects[:1])))
    pixels[40:50, 30:60] = S.OBJECT_COLORS["green"]  # a 10 x 30 bar is no shape the evaluator knows
    assert E.describe(E.analyze(Image.fromarray(pixels))) == "red circle, green ? on white"
    assert E.describe(E.analyze(Image.new("RGB", (64, 64), "white"))) == "nothing on white"


def test_evaluate_end_to_end(tmp_path):
    results = E.evaluate(_oracle(6, 11, 64), n_per_category=6, seed=11, edit_fn=lambda srcs, _: list(srcs),
                         n_edits=12, batch_size=4, progress=False)
    assert results["categories"] == {c: 100.0 for c in S.CATEGORIES} and results["overall"] == 100.0
    assert results["edits"]["success"] == 0.0  # returning the source edits nothing
    assert results["edits"]["psnr_outside"] == E.PSNR_CAP_DB  # ... but preserves everything
    assert len(results["records"]) == len(results["images"]) == 6 * 6 + 12
    assert {r["kind"] for r in results["records"]} == {"t2i", "edit"}
    t2i = [r for r in results["records"] if r["kind"] == "t2i"]
    assert all(r["found"].endswith(" on white") and "?" not in r["found"] for r in t2i)
    single = next(r for r in t2i if r["category"] == "single_object")
    spec = dict(S.prompt_set("single_object", 6, 11))[single["caption"]]
    assert single["found"] == f"{spec['objects'][0]['color']} {spec['objects'][0]['shape']} on white"
    assert all(r["found"] == E.describe(E.analyze(src)) for r, src in zip(results["records"], results["sources"])
               if r["kind"] == "edit")  # this editor returns its input
    table = E.format_table(results)
    assert "| counting | 100.0 |" in table and "| **all** | **0.0** |" in table
    grid = E.save_grid(results["records"][:10], results["images"][:10], tmp_path / "grid.png", cols=4)
    assert (tmp_path / "grid.png").is_file() and grid.size[0] == 4 * (128 + 2 * E.GRID_BORDER)
    # with sources, each edit shows its input (gray frame) before its output: 3 edits -> 6 cells in one row
    assert results["sources"][:36] == [None] * 36 and all(s.size == (64, 64) for s in results["sources"][36:])
    cell = 128 + 2 * E.GRID_BORDER
    grid = E.save_grid(results["records"][36:39], results["images"][36:39], tmp_path / "g2.png", cols=8,
                       sources=results["sources"][36:39])
    assert grid.size[0] == 6 * cell
    assert grid.getpixel((1, 1)) == E.INPUT_COLOR and grid.getpixel((cell + 1, 1)) in (E.PASS_COLOR, E.FAIL_COLOR)
    assert np.array_equal(np.asarray(grid.crop((E.GRID_BORDER, E.GRID_BORDER, E.GRID_BORDER + 128,
                                                E.GRID_BORDER + 128)).resize((64, 64), Image.NEAREST)),
                          np.asarray(results["sources"][36].convert("RGB")))
    with pytest.raises(ValueError, match="one source"):
        E.save_grid(results["records"][:2], results["images"][:2], tmp_path / "g3.png", sources=[None])
    blank = E.evaluate(lambda caps: [Image.new("RGB", (64, 64), "white")] * len(caps), 3, seed=0, progress=False)
    assert blank["overall"] == 0.0 and blank["edits"] is None
    with pytest.raises(ValueError, match="PIL images"):
        E.evaluate(lambda caps: caps[:1], 2, seed=0, progress=False)
    with pytest.raises(ValueError, match="edit_fn"):
        E.evaluate(_oracle(1, 0, 64), 1, seed=0, n_edits=3, progress=False)


# -- concepts: shapes the default world never draws ---------------------------------------------------------------

# sha256 of the default world's samples and evaluation sets (``_default_world_fingerprint``), computed before the
# concept shapes existed: adding them must leave the bundled model's training data and benchmark untouched.
DEFAULT_WORLD_SHA256 = "204a33cdc8753c1449ae3d9087dc48c7346bb108d0c2acc58c28789f49938fa0"


def _default_world_fingerprint() -> str:
    import hashlib

    h = hashlib.sha256()

    def put(v):
        h.update(np.asarray(v).tobytes() if isinstance(v, Image.Image) else repr(v).encode())

    for ds in (S.ShapesDataset(200, seed=0),
               S.ShapesDataset(100, seed=3, backgrounds=0.3, weights={"counting": 2, "move": 3})):
        for i in range(len(ds)):
            for k, v in sorted(ds[i].items()):
                put(k)
                put(v)
    for c in S.CATEGORIES:
        put(S.prompt_set(c, 30, seed=0))
    for item in S.edit_set(30, seed=0):
        for v in item:
            put(v)
    return h.hexdigest()


def test_default_world_is_unchanged_by_concepts():
    assert _default_world_fingerprint() == DEFAULT_WORLD_SHA256
    assert "star" in S.CONCEPT_SHAPES and "star" not in S.SHAPES
    for category in S.CATEGORIES:  # the default world never names or draws a concept shape
        for caption, _, scene in _t2i(category, 40, seed=12):
            assert "star" not in caption and all(o.shape in S.SHAPES for o in scene.objects)


def test_star_renders_and_reads_exactly():
    objs = (S.Obj("star", "red", 18.0, 18.0, 28), S.Obj("circle", "blue", 48.0, 46.0, 14))
    for background in S.BACKGROUND_COLORS:
        result = E.analyze(S.render(S.Scene(objs, background)))
        got = sorted((d.shape, d.color, d.bbox, d.area) for d in result.objects)
        assert got == sorted((o.shape, o.color, S.object_bbox(o, 64), int(S.object_mask(o, 64).sum())) for o in objs)
    mask = S.shape_mask("star", 500, 500, 1000, 1000, 1000)
    assert abs(mask.mean() - E.analysis.SHAPE_FILL["star"]) < 1e-3  # the analyzer's template fill is the star's
    assert mask[500, 500] and mask[5, 500] and not mask[5, 5] and not mask[990, 500]  # a point up, none down
    assert S.size_range(64, "star") == (24, 30) and S.size_range(64) == S.size_range(64, "circle") == (12, 18)


def _concept_samples(n: int, seed: int):
    return [S.generate_concept("star", S.CONCEPT_CATEGORIES[k % 3], np.random.default_rng([seed, k]))
            for k in range(n)]


def test_concept_ground_truth_is_recognised():
    samples = _concept_samples(200, seed=13)
    assert _t2i_accuracy(samples, perturb=False) == 100.0
    assert _t2i_accuracy(samples, perturb=True) >= 98.0
    # what the evaluator reads is the star, not a default shape that happens to fit the spec's count
    rng = np.random.default_rng(0)
    for _, spec, scene in samples[:60]:
        found = E.analyze(_perturb(S.render(scene), rng)).objects
        assert sum(d.shape == "star" for d in found) == sum(w["shape"] == "star" for w in spec["objects"])


def test_default_shapes_are_never_read_as_concepts():
    rng = np.random.default_rng(1)
    for category in S.CATEGORIES:
        for _, _, scene in _t2i(category, 60, seed=14):
            image = S.render(scene)
            for im in (image, _perturb(image, rng)):
                assert all(d.shape != "star" for d in E.analyze(im).objects)
    # a star redrawn as a default shape fails a star prompt, and the other way round
    for _, spec, scene in _t2i("single_object", 20, seed=15):
        o = scene.objects[0]
        star = S.Scene((S.Obj("star", o.color, 32, 32, 26),))
        assert not E.check(spec, E.analyze(S.render(star)))
    for _, spec, scene in _concept_samples(30, seed=16):
        if spec["category"] == "single_object":
            o = scene.objects[0]
            circle = S.Scene((S.Obj("circle", o.color, o.cx, o.cy, o.size),))
            assert E.check(spec, E.analyze(S.render(scene))) and not E.check(spec, E.analyze(S.render(circle)))


def test_concept_prompts_name_the_concept_and_are_fixed():
    for category in S.CONCEPT_CATEGORIES:
        prompts = S.concept_prompt_set("star", category, 30, seed=3)
        assert prompts == S.concept_prompt_set("star", category, 30, seed=3)
        assert prompts != S.concept_prompt_set("star", category, 30, seed=4)
        assert all(re.search(r"\bstars?\b", c) for c, _ in prompts)
        assert len({_skeleton(c.replace("star", "circle")) for c, _ in prompts}) >= 3  # worded several ways
        assert all(any(w["shape"] == "star" for w in spec["objects"]) and spec["category"] == category
                   for _, spec in prompts)
    assert "two" in S.concept_prompt_set("star", "counting", 1, seed=0)[0][0]
    for bad in (("hexagon", "single_object"), ("star", "position")):
        with pytest.raises(ValueError, match="concept|category"):
            S.concept_prompt_set(*bad, 3, seed=0)


def test_concept_dataset_is_a_folder_source(tmp_path):
    from nextstep.data.sources import FolderSource

    index = S.concept_dataset("star", tmp_path / "star", n=12, seed=5)
    assert index == tmp_path / "star" / "captions.jsonl"
    source = FolderSource(tmp_path / "star")
    assert len(source) == 12
    records = [json.loads(line) for line in index.read_text().splitlines()]
    for i in range(12):
        item = source[i]
        caption, spec, scene = S.concept_sample("star", i, seed=5)
        assert item["kind"] == "t2i" and item["caption"] == caption == records[i]["caption"]
        assert records[i]["spec"] == spec and np.array_equal(_pixels(item["image"]), _pixels(S.render(scene)))
        assert E.check(spec, E.analyze(item["image"]))
    eval_captions = {c for cat in S.CONCEPT_CATEGORIES for c, _ in S.concept_prompt_set("star", cat, 12, seed=5)}
    assert len({r["caption"] for r in records} - eval_captions) > 0  # another stream than the evaluation set
    with pytest.raises(FileExistsError, match="captions.jsonl"):
        S.concept_dataset("star", tmp_path / "star", n=3)
    with pytest.raises(ValueError, match="concept"):
        S.concept_dataset("hexagon", tmp_path / "hex")
    with pytest.raises(ValueError, match="n must"):
        S.concept_dataset("star", tmp_path / "zero", n=0)


def test_concept_dataset_replays_the_default_world(tmp_path):
    """``replay`` adds the default world's samples (what the base model was trained on) after the concept's."""
    from nextstep.data.sources import FolderSource

    S.concept_dataset("star", tmp_path / "mix", n=3, seed=5, replay=12)
    source, world = FolderSource(tmp_path / "mix"), S.ShapesDataset(12, seed=6)
    assert len(source) == 15 and source[0]["caption"] == S.concept_sample("star", 0, seed=5)[0]
    assert "replay" not in source[0]
    for i in range(12):
        got, want = source[3 + i], world[i]
        assert got["kind"] == want["kind"] and got["replay"] is True  # marked: a LoRA recipe may self-distil them
        if want["kind"] == "t2i":
            assert got["caption"] == want["caption"]
            assert np.array_equal(_pixels(got["image"]), _pixels(want["image"]))
        else:
            assert got["instruction"] == want["instruction"]
            assert np.array_equal(_pixels(got["target"]), _pixels(want["target"]))
    assert {source[3 + i]["kind"] for i in range(12)} == {"t2i", "edit"}  # both kinds replayed (sample 8: an edit)
    S.concept_dataset("star", tmp_path / "rep", n=3, seed=5, replay=2, repeat=4)  # the concept 4 times, then the world
    lines = (tmp_path / "rep" / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 14 and lines[:3] * 4 == lines[:12] and len(list((tmp_path / "rep" / "images").iterdir())) >= 5


def test_concept_dataset_mix_and_replay_options(tmp_path):
    """``mix`` weighs the concept's categories; ``replay_options`` draw the replay as a recipe's shapes data does."""
    from nextstep.data.sources import FolderSource

    S.concept_dataset("star", tmp_path / "two", n=12, seed=5, mix={"two_objects": 1})
    specs = [json.loads(line)["spec"] for line in (tmp_path / "two" / "captions.jsonl").read_text().splitlines()]
    assert [s["category"] for s in specs] == ["two_objects"] * 12
    assert S.concept_sample("star", 3, 5, mix={"two_objects": 1})[1] == specs[3]
    for bad in ({"two_objects": -1}, {"single_object": 0}, {"squares": 1}):
        with pytest.raises(ValueError, match="mix"):
            S.concept_dataset("star", tmp_path / "bad", n=2, mix=bad)
    options = {"mix": {"t2i": 1.0}, "backgrounds": 0.5, "weights": {"two_objects": 3}}
    S.concept_dataset("star", tmp_path / "like", n=1, seed=5, replay=6, replay_options=options)
    source, world = FolderSource(tmp_path / "like"), S.ShapesDataset(6, seed=6, **options)
    assert [source[1 + i]["caption"] for i in range(6)] == [world[i]["caption"] for i in range(6)]
    assert [world[i]["caption"] for i in range(6)] != [S.ShapesDataset(6, seed=6)[i].get("caption") for i in range(6)]


def test_evaluate_a_concept():
    specs = {c: s for cat in S.CONCEPT_CATEGORIES for c, s in S.concept_prompt_set("star", cat, 5, 7)}
    rng = np.random.default_rng(0)
    oracle = lambda caps: [S.render(S.scene_for_spec(specs[c], rng)) for c in caps]  # noqa: E731
    results = E.evaluate(oracle, 5, seed=7, concept="star", progress=False)
    assert results["categories"] == {c: 100.0 for c in S.CONCEPT_CATEGORIES} and results["concept"] == "star"
    assert "| category (star prompts) | accuracy (%) |" in E.format_table(results)

    def default_shapes(caps):  # what a model that never saw a star draws: the right colours, a default shape
        return [S.render(S.scene_for_spec({**specs[c], "objects": [{**w, "shape": "circle"} for w in
                                                                   specs[c]["objects"]]}, rng)) for c in caps]

    assert E.evaluate(default_shapes, 5, seed=7, concept="star", progress=False)["overall"] == 0.0
    with pytest.raises(ValueError, match="concept"):
        E.evaluate(oracle, 1, seed=0, concept="hexagon", progress=False)
