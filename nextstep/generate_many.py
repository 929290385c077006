"""A benchmark's worth of images: many prompts x N images, data parallel over torchrun ranks, resumable.

Determinism. Image ``k`` of prompt ``i`` draws its noise from its own generator, seeded with
:func:`image_seed` (``seed``, ``i``, ``k``). Prompts are cut into fixed *units* of ``batch`` consecutive prompts
(all their images in one pipeline call); a unit is always generated whole, with the same rows in the same order.
Batched rows round differently from single rows (a few pixel values move by one), so this fixed composition is
what makes the files independent of the number of ranks, of which rank drew which unit, and of interruptions.
``batch`` is therefore part of a run's identity (with the model, dtype, settings and seed); so are the device
kind and the thread count, which change float rounding too.

Resumption. Every file is written atomically (a temporary file, then a rename): a file with its final name is
complete. A run skips every unit whose images all exist (PNG signature and end chunk checked); an unfinished unit
(a kill between two renames) is generated again and only its missing images are written, so nothing written is
ever rewritten or lost. The run's identity is kept in ``generate-many.json``; resuming with different settings is
refused. Several ranks need one shared output directory (one filesystem across nodes).

Outputs under ``out``:
    generate-many.json                  the run's identity (checked on resume)
    manifest.jsonl                      one line per image (written by rank 0 when every image exists)
    layout "flat":     images/<i:05d>_<k:04d>.png
    layout "geneval":  <i:05d>/metadata.jsonl (the prompt's JSON line as given), <i:05d>/samples/<k:04d>.png

GenEval (github.com/djghosh13/geneval, ``evaluation/evaluate_images.py IMAGE_FOLDER``) reads every sub-folder whose
name is all digits, ``json.load``s its ``metadata.jsonl`` and scores every ``samples/`` file matching
``\\d+\\.png``; other entries (this module's two files) are ignored. Its prompt file is
``prompts/evaluation_metadata.jsonl`` (553 prompts, 4 images each).

Other benchmarks (what their scorers read, from their public repositories; this module has no layout for them, the
flat layout plus the manifest maps onto each):
- DPG-Bench (ELLA's ``dpg_bench/compute_dpg_bench.py --image-root-path DIR --resolution R --pic-num 4``): one PNG
  per prompt, ``DIR/<item_id>.png``, a 2x2 grid of four R x R images (the scorer crops the four tiles); ``item_id``
  is the prompt file's name in ``dpg_bench/prompts/<item_id>.txt``. Every file in DIR is read as an image.
- GenAI-Bench (t2v_metrics ``genai_bench/evaluate.py --output_dir OUT --gen_model NAME``): one image per prompt,
  ``OUT/NAME/<prompt_idx>.jpeg`` with ``prompt_idx`` the 5-digit key of ``genai_image.json`` (00000 ...); its
  generator saves JPEG and the evaluator asserts that exact file name.
- WISE (``gpt_eval.py --image_dir DIR``): one image per prompt, ``DIR/<prompt_id>.png`` with ``prompt_id`` 1..1000
  from ``data/*.json`` (all three category files share one folder).
- OneIG-Bench (``run_*.sh`` with ``image_dir``, ``model_names``, ``image_grid=2`` for four images per prompt):
  ``images/<category>/<model_name>/<id>.webp``, categories anime, human, object, text, reasoning (and
  multilingualism for the Chinese set), ``id`` the 3-digit id of ``OneIG-Bench.csv``; four images as one 2x2 grid
  (NextStep's release writes lossless WebP grids).
Not verified here: the exact id formats of GenAI-Bench and WISE beyond their scripts' f-strings, and whether the
OneIG scorer accepts PNG as well as WebP.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .config import Settings
from .errors import InputError
from .files import atomic_path
from .images import save_pngs

if TYPE_CHECKING:  # the process-group helpers load with the first call, not with the CLI's parser
    from .train.distributed import DistInfo

LAYOUTS = ("flat", "geneval")
# a run record's keys as the `generate-many` command line names what decides them (sampling settings keep their own
# names: the CLI turns those into its flags)
RECORD_WORDS = {"prompts": "the number of prompts", "prompts_sha256": "the prompts", "images_per_prompt": "-n",
                "seed": "--seed", "layout": "--layout", "size": "--size", "batch": "--batch", "model": "--model",
                "vae": "--vae", "dtype": "--dtype", "quantize": "--quantize", "compile": "--compile",
                "device": "--device", "head": "--fast's head"}
RUN_FILE = "generate-many.json"
MANIFEST = "manifest.jsonl"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
POLL_S = 0.5  # how often rank 0 looks for the other ranks' images while it waits for them


@dataclass(frozen=True)
class PromptItem:
    index: int  # 0-based, counting prompts (blank lines are skipped)
    prompt: str
    line: str  # the prompt's JSON line as given (.jsonl), or {"prompt": ...} (.txt): GenEval's metadata.jsonl
    metadata: dict[str, Any]  # the parsed JSON object ({"prompt": ...} for .txt)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """A ``.txt`` file (one prompt per line) or a ``.jsonl`` file (one JSON object with a "prompt" string per line;
    other keys are kept as metadata). Blank lines are skipped. Raises ``InputError`` naming the file and line."""
    p = Path(path)
    if p.suffix.lower() not in (".txt", ".jsonl"):
        raise InputError(f"prompts file must end in .txt (one prompt per line) or .jsonl (objects with a 'prompt' "
                         f"key), got {p}")
    if not p.is_file():
        raise InputError(f"prompts file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    items: list[PromptItem] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if p.suffix.lower() == ".txt":
            obj = {"prompt": line}
            items.append(PromptItem(len(items), line, json.dumps(obj, ensure_ascii=False), obj))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise InputError(f"{p}, line {number}: each line must be a JSON object with a non-empty string "
                             f"'prompt', got {line[:80]!r}")
        items.append(PromptItem(len(items), obj["prompt"], line, obj))
    if not items:
        raise InputError(f"{p} holds no prompts (only blank lines)")
    return items


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of one image's generator: a hash of (run seed, prompt index, image index), 63 bits, so it does not
    depend on how many images a prompt has, how prompts are batched or which rank draws them."""
    digest = hashlib.sha256(f"nextstep-generate-many/{seed}/{prompt_index}/{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_relpath(layout: str, prompt_index: int, image_index: int) -> str:
    if layout == "geneval":
        return f"{prompt_index:05d}/samples/{image_index:04d}.png"
    return f"images/{prompt_index:05d}_{image_index:04d}.png"


def is_complete_png(path: Path) -> bool:
    """A file that starts with the PNG signature and ends with the IEND chunk (a truncated file does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
            f.seek(0, 2)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), 2)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


@dataclass
class Job:
    """What to generate and where. ``settings``: resolved text-to-image settings (``SamplingConfig.resolve``);
    ``height``/``width``: None for the model's native size; ``identity``: whatever else the caller vouches changes
    the images (model fingerprint, dtype, quantization, compile): recorded in the run file and every manifest line,
    and checked on resume."""

    items: list[PromptItem]
    out: Path
    n: int = 4
    seed: int = 0
    batch: int = 1
    layout: str = "flat"
    height: int | None = None
    width: int | None = None
    settings: Settings | None = None
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.layout not in LAYOUTS:
            raise InputError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("n", "batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        if self.settings is None:
            raise InputError("settings are required (SamplingConfig.resolve(False, ...))")

    # ---- identity -------------------------------------------------------------------------------------------------
    def run_settings(self) -> dict[str, Any]:
        """Everything besides the prompt and seed that decides an image: one dict, in every manifest line."""
        size = "native" if self.height is None and self.width is None else [self.width, self.height]
        return {**asdict(self.settings), "size": size, "batch": self.batch, **self.identity}

    def record(self) -> dict[str, Any]:
        prompts = "\n".join(item.line for item in self.items)
        return {"prompts": len(self.items), "prompts_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
                "images_per_prompt": self.n, "seed": self.seed, "layout": self.layout,
                "settings": self.run_settings()}

    def prepare(self, is_main: bool) -> None:
        """Before any rank generates: refuse to resume a different run (every rank checks, so all fail alike); on
        the main rank write the run file, GenEval's metadata files, and remove temporaries a killed run left."""
        path = self.out / RUN_FILE
        record = json.loads(json.dumps(self.record()))  # as it reads back (tuples -> lists)
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise InputError(f"{path} is not valid JSON: remove it, or use a new output directory") from None
            if isinstance(old.get("settings"), dict):  # a setting added since that run was made: its default then
                for f in fields(Settings):
                    if f.default is not MISSING:
                        old["settings"].setdefault(f.name, f.default)
            if old != record:
                diff = sorted(k for k in set(old) | set(record) if k != "settings" and old.get(k) != record.get(k))
                s_old, s_new = old.get("settings") or {}, record["settings"]
                diff += sorted(k for k in set(s_old) | set(s_new) if s_old.get(k) != s_new.get(k))
                words = list(dict.fromkeys(RECORD_WORDS.get(k, k) for k in diff))  # a setting: the CLI names it
                raise InputError(f"{self.out} holds another run ({path}): it differs in {', '.join(words)}; resume "
                                 f"it with the same prompts and settings, or write to a new output directory")
        elif self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} is a file, not a directory")
        if not is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            _write_text(path, json.dumps(record, indent=2) + "\n")
        if self.layout == "geneval":
            for item in self.items:
                folder = self.out / f"{item.index:05d}"
                (folder / "samples").mkdir(parents=True, exist_ok=True)
                meta = folder / "metadata.jsonl"
                if not meta.is_file() or meta.read_text(encoding="utf-8") != item.line + "\n":
                    _write_text(meta, item.line + "\n")
        for tmp in self.out.rglob(".tmp-*"):  # a killed write's leftovers (complete files are never named so)
            tmp.unlink(missing_ok=True)

    # ---- work -----------------------------------------------------------------------------------------------------
    def path(self, prompt_index: int, image_index: int) -> Path:
        return self.out / image_relpath(self.layout, prompt_index, image_index)

    def units(self) -> list[list[PromptItem]]:
        """Consecutive groups of ``batch`` prompts: the fixed composition of every pipeline call."""
        return [self.items[i:i + self.batch] for i in range(0, len(self.items), self.batch)]

    def unit_paths(self, unit: list[PromptItem]) -> list[Path]:
        return [self.path(item.index, k) for item in unit for k in range(self.n)]

    def manifest_lines(self) -> list[dict[str, Any]]:
        settings = self.run_settings()
        return [{"prompt_index": item.index, "image_index": k, "prompt": item.prompt,
                 "seed": image_seed(self.seed, item.index, k), "path": image_relpath(self.layout, item.index, k),
                 "metadata": item.metadata, "settings": settings}
                for item in self.items for k in range(self.n)]


@dataclass
class Summary:
    images: int  # all images of the run
    existing: int  # already complete when this run started
    generated: int  # written by this run, all ranks
    seconds: float
    manifest: Path | None  # written by the main rank

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def generate_many(pipe, job: Job, info: DistInfo | None = None, progress: bool = True) -> Summary:
    """Generate every missing image of ``job`` with ``pipe`` (this rank's replica); ``job.prepare`` must have run.

    Pending units (any image missing) are dealt round-robin over ranks, found by every rank before any rank writes
    (a barrier). Rank 0 shows a progress bar over all ranks' images (it counts files), waits for every image, then
    writes ``manifest.jsonl``."""
    from .train.distributed import DistInfo, barrier

    info = info or DistInfo()
    start = time.perf_counter()
    units = job.units()
    pending = [u for u in units if not all(is_complete_png(p) for p in job.unit_paths(u))]
    awaited = {p for u in pending for p in job.unit_paths(u) if not is_complete_png(p)}
    total = len(job.items) * job.n
    existing = total - len(awaited)
    barrier(info)  # every rank has its list of pending units before anything is written
    bar = tqdm(total=total, initial=existing, unit="img", desc="images", dynamic_ncols=True, smoothing=0.1,
               disable=not (progress and info.is_main))
    try:
        for unit in pending[info.rank::info.world]:
            _generate_unit(pipe, job, unit)
            if info.is_main:
                _count_written(awaited, bar)
        if info.is_main:
            while awaited:  # the other ranks' images (a failed rank makes torchrun stop this one)
                time.sleep(POLL_S)
                _count_written(awaited, bar)
    finally:
        bar.close()
    barrier(info)
    manifest = None
    if info.is_main:
        manifest = job.out / MANIFEST
        lines = job.manifest_lines()
        missing = [line["path"] for line in lines if not is_complete_png(job.out / line["path"])]
        if missing:
            raise RuntimeError(f"{len(missing)} images are missing after every rank finished, e.g. {missing[0]}")
        _write_text(manifest, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return Summary(total, existing, total - existing, time.perf_counter() - start, manifest)


def _generate_unit(pipe, job: Job, unit: list[PromptItem]) -> None:
    """One pipeline call for every image of ``unit`` (one row and one generator per image); writes the missing."""
    prompts = [item.prompt for item in unit for _ in range(job.n)]
    generators = [torch.Generator().manual_seed(image_seed(job.seed, item.index, k))
                  for item in unit for k in range(job.n)]
    out = pipe(prompts, height=job.height, width=job.width, num_images_per_prompt=1, generator=generators,
               progress=False, **asdict(job.settings))
    todo = [(im, p) for im, p in zip(out.images, job.unit_paths(unit)) if not is_complete_png(p)]
    if todo:
        save_pngs([im for im, _ in todo], [p for _, p in todo])


def _count_written(awaited: set[Path], bar) -> None:
    done = {p for p in awaited if p.exists()}  # final names appear only by atomic rename: complete
    awaited -= done
    bar.update(len(done))


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a model or VAE directory: its config.json and the names and sizes of its weight files
    (cheap; tells one checkpoint from another without reading the weights)."""
    root = Path(path)
    h = hashlib.sha256((root / "config.json").read_bytes() if (root / "config.json").is_file() else b"")
    for f in sorted(root.iterdir()) if root.is_dir() else []:
        if f.suffix in (".safetensors", ".pt", ".bin") or f.name.endswith(".index.json"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def describe_rate(summary: Summary) -> str:
    """One line: how many images, how many this run made, and how fast."""
    line = f"{summary.images} images: {summary.generated} generated, {summary.existing} already there"
    rate = summary.images_per_second
    if rate == 0:
        return line
    return line + f", in {summary.seconds:.1f} s ({f'{rate:.2f} images/s' if rate >= 1 else f'{1 / rate:.1f} s/image'})"
