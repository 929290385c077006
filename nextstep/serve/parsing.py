"""Reading requests, bounded and in memory (a JSON body, or a multipart form with the image to edit), and checking
them against the loaded model: what the request schema cannot know (sizes, samplers, the image tag)."""

from __future__ import annotations

import io
import json
import re
import secrets
from typing import Any

import torch
from fastapi import Request
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import InputError, SettingError
from ..images import load_mask
from ..pipeline import NextStepPipeline
from ..prompt import IMAGE_TAG, require_prompt
from ..sampling.flow import DISTILLED
from ..settings import SPEC, SPECS, Settings
from .limits import (
    IMAGE_FORMATS,
    MAX_FORM_BYTES,
    MAX_INPUT_PIXELS,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_SEED,
    MAX_SIZE,
    MAX_UPLOAD_BYTES,
)
from .schemas import ApiError, EditRequest, GenerationRequest, validate_request

IMAGE_FIELDS = ("image", "image[]")  # OpenAI's clients send a list of images as repeated "image[]" parts
MASK_FIELD = "mask"  # OpenAI's: a PNG of the image's size, fully transparent (alpha 0) where to edit


# ---- checking a parsed request -----------------------------------------------------------------------------------
def _parse_size(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", text)
    if not m:
        raise ApiError(400, f"{what} must look like WIDTHxHEIGHT (e.g. 512x512), got {text!r}", param="size")
    return int(m.group(1)), int(m.group(2))


def _check_size(w: int, h: int, multiple: int, what: str) -> None:
    for name, v in (("width", w), ("height", h)):
        if v < multiple or v % multiple:
            raise ApiError(400, f"{what} {w}x{h}: {name} must be a positive multiple of {multiple}", param="size")
        if v > MAX_SIZE:
            raise ApiError(400, f"{what} {w}x{h}: {name} {v} is over the limit of {MAX_SIZE} pixels per side",
                           param="size")


def _check_text(name: str, text: str | None, tags_allowed: int, required: bool) -> None:
    """The schema bounds the length; this rejects a blank prompt and image tags the request has no image for."""
    if text is None:
        return
    if required:
        try:
            require_prompt(text, name)  # the pipeline's and the CLI's rule
        except InputError as e:
            raise ApiError(400, str(e), param=name) from None
    if text.count(IMAGE_TAG) > tags_allowed:
        raise ApiError(400, f"{name} may contain {IMAGE_TAG} at most {tags_allowed} time(s) (it marks the input "
                            f"image of an edit)", param=name)


def _output_size(req: GenerationRequest, multiple: int, default_size: tuple[int, int],
                 image: Image.Image | None) -> tuple[int, int]:
    """(width, height): the requested size, else an edit's input size, else the default; checked."""
    if req.size not in (None, "auto"):
        (w, h), what = _parse_size(req.size, "size"), "size"
    elif image is not None:
        (w, h), what = image.size, "the input image is"
        if w % multiple or h % multiple or w > MAX_SIZE or h > MAX_SIZE:
            raise ApiError(400, f"the input image is {w}x{h}: pass size (multiples of {multiple}, at most "
                                f"{MAX_SIZE} per side); the image is then resized to cover it and center-cropped",
                           param="size")
    else:
        (w, h), what = default_size, "size"
    _check_size(w, h, multiple, what)
    return w, h


def _check_openai_fields(req: GenerationRequest) -> None:
    """The OpenAI fields that ask for something this server does not make (the rest are ignored, see schemas)."""
    if req.response_format not in (None, "b64_json"):
        raise ApiError(400, f"response_format {req.response_format!r} is not supported: this server keeps no "
                            f"files to link to; use 'b64_json'", param="response_format")
    if req.output_format not in (None, "png"):
        raise ApiError(400, f"output_format {req.output_format!r} is not supported: the images are PNG",
                       param="output_format")
    if req.background not in (None, "auto", "opaque"):
        raise ApiError(400, f"background {req.background!r} is not supported: the images are opaque ('auto' or "
                            f"'opaque')", param="background")


def _prompt_rows(pipe: NextStepPipeline, req: GenerationRequest, settings: Settings, size: tuple[int, int],
                 edit: bool) -> list[list[int]]:
    """The token ids of every row the pipeline will prefill (the prompt first, then one per guidance branch), from
    the pipeline itself so they cannot drift from what it runs."""
    grid = (size[1] // pipe.size_multiple, size[0] // pipe.size_multiple)
    return pipe.prompt_rows(req.prompt, grid, settings, edit)


def _positions(rows: list[list[int]], size: tuple[int, int], multiple: int) -> int:
    """Positions a generation fills: its longest prompt row plus the image tokens it draws."""
    return max(map(len, rows)) + (size[0] // multiple) * (size[1] // multiple)


def _check_context(pipe: NextStepPipeline, req: GenerationRequest, settings: Settings, size: tuple[int, int],
                   edit: bool) -> list[int]:
    """Refuse a size the model's positions cannot hold (the prompt, an edit's input image and the new image
    together), naming the largest square size that fits this prompt; returns the prompt row."""
    m, limit = pipe.size_multiple, pipe.model.config.transformer.max_position_embeddings
    rows = _prompt_rows(pipe, req, settings, size, edit)
    need = _positions(rows, size, m)
    if need <= limit:
        return rows[0]
    largest = pipe.largest_square(req.prompt, settings, edit, MAX_SIZE)  # the CLI's advice too
    hint = (f"the largest square size for this prompt is {largest}x{largest}"
            if largest else "no size fits: shorten the prompt")
    raise ApiError(400, f"size {size[0]}x{size[1]} needs {need} positions (prompt and image tokens) but the model "
                        f"holds {limit}: {hint}", param="size", code="context_length_exceeded")


def _usage(prompt_row: list[int], size: tuple[int, int], multiple: int, n: int, edit: bool) -> dict[str, Any]:
    """OpenAI's ``usage`` object in this model's tokens: the prompt row in, n images of h*w tokens out."""
    image_tokens = (size[0] // multiple) * (size[1] // multiple)
    image_in = image_tokens if edit else 0  # an edit's input image is in the prompt at the output size
    out = n * image_tokens
    return {"input_tokens": len(prompt_row), "output_tokens": out, "total_tokens": len(prompt_row) + out,
            "input_tokens_details": {"text_tokens": len(prompt_row) - image_in, "image_tokens": image_in},
            "output_tokens_details": {"text_tokens": 0, "image_tokens": out}}


def build_job_kwargs(req: GenerationRequest, pipe: NextStepPipeline, default_size: tuple[int, int],
                     image: Image.Image | None = None, mask: Image.Image | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check a parsed request (already within the schema's bounds) against the model; returns the pipeline keyword
    arguments and the fields of the final response besides the images (seed, size, usage). Settings the request
    leaves out stay None, so the pipeline applies the model's defaults."""
    edit = image is not None
    _check_text("prompt", req.prompt, 1 if edit else 0, required=True)
    _check_text("negative_prompt", req.negative_prompt, 0, required=False)
    _check_openai_fields(req)
    overrides = {s.name: getattr(req, s.api, None) for s in SPECS if s.api}  # t2i requests have no edit-only ones
    fast = req.fast or req.sampler == DISTILLED
    try:  # the pipeline's own validation of the sampling settings, before the request is queued
        settings = pipe.resolve_settings(edit, fast, **overrides)
    except SettingError as e:
        field = SPEC[e.field].api or e.field
        raise ApiError(400, f"{field} {e.problem}", param=field) from None
    except InputError as e:
        raise ApiError(400, str(e), param="fast" if fast and pipe.head is None else None) from None
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    n = 1 if req.n is None else req.n
    w, h = _output_size(req, pipe.size_multiple, default_size, image)
    prompt_row = _check_context(pipe, req, settings, (w, h), edit)
    kwargs: dict[str, Any] = dict(prompt=req.prompt, image=image, height=h, width=w, num_images_per_prompt=n,
                                  generator=torch.Generator().manual_seed(seed), fast=bool(req.fast), **overrides)
    if mask is not None:  # an edit's mask (read_edit_request checked it against the image)
        kwargs["mask"] = mask
    loaded = getattr(pipe, "lora_names", [])
    if req.lora is not None and req.lora not in loaded:
        raise ApiError(400, f"lora {req.lora!r} is not an adapter of this server (it has: "
                            f"{', '.join(loaded) or 'none'}; nextstep serve --lora NAME=DIR loads one)", param="lora")
    if loaded:  # which adapter the call runs with (None: the base): part of the worker's batch key
        kwargs["lora"] = req.lora
    response = {"seed": seed, "size": f"{w}x{h}", "output_format": "png", "background": "opaque",
                "usage": _usage(prompt_row, (w, h), pipe.size_multiple, n, edit)}
    return kwargs, response


def stream_partials(req: GenerationRequest) -> int | None:
    """OpenAI's streaming on the plain routes: None when the request does not ask for it (``stream`` false or left
    out), else how many partial images to send (``partial_images``, 0 when left out: only the final image). One image
    per streamed request: OpenAI's stream events carry no image index, so ``n`` > 1 is refused (concurrent requests of
    one image each share the worker's batch instead)."""
    if not req.stream:
        return None
    if req.n not in (None, 1):
        raise ApiError(400, f"stream=true streams one image per request, got n={req.n}: send n requests of one "
                            f"image (the server batches them), or use the /stream routes for n images with previews",
                       param="n")
    return req.partial_images or 0


# ---- reading request bodies --------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int, what: str) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"{what} is {int(length)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"{what} is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _nesting(obj: Any) -> int:
    """How deeply JSON arrays and objects nest (level by level, so no recursion to exhaust)."""
    depth, level = 0, [obj]
    while level := [o for o in level if isinstance(o, (dict, list))]:
        depth += 1
        level = [v for o in level for v in (o.values() if isinstance(o, dict) else o)]
    return depth


def _require_content_type(request: Request, expected: bytes, example: str) -> None:
    """415 for any other content type: a web page can send text/plain or a form to another site without asking
    first (no CORS preflight), but not application/json."""
    ctype, _ = parse_options_header(request.headers.get("content-type", ""))
    if ctype != expected:
        raise ApiError(415, f"send {expected.decode()} ({example}), got content type "
                            f"{request.headers.get('content-type') or 'none'!r}", code="unsupported_media_type")


async def read_json_request(request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
    _require_content_type(request, b"application/json", "a JSON object with a 'prompt'")
    body = await _read_body(request, MAX_JSON_BYTES, "the request body")
    too_deep = ApiError(400, f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} deep; send a "
                             f"flat JSON object of fields")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:  # deeper than the parser's stack
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object such as "
                            f'{{"prompt": "a red circle", "size": "256x256"}}') from None
    if _nesting(obj) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(obj).__name__}")
    return validate_request(schema, obj, strict=True)


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """multipart/form-data -> (text fields, file fields: every file under each name), all in memory. A text field
    given twice, or a name used for both text and files, is an error."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "malformed multipart body: the content type has no boundary")
    parts: list[tuple[dict[bytes, bytes], bytearray]] = []
    header: list[bytes] = [b"", b""]

    def on_part_begin():
        parts.append(({}, bytearray()))

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        parts[-1][0][header[0].lower()] = header[1]
        header[0], header[1] = b"", b""

    def on_part_data(data, start, end):
        parts[-1][1].extend(data[start:end])

    callbacks = dict(on_part_begin=on_part_begin, on_header_field=on_header_field, on_header_value=on_header_value,
                     on_header_end=on_header_end, on_part_data=on_part_data)
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ApiError(400, "malformed multipart body: a part has no name")
        if name in fields or (name in files and b"filename" not in disp):
            raise ApiError(400, f"field '{name}' is given more than once", param=name)
        if b"filename" in disp:
            files.setdefault(name, []).append(bytes(data))
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"field '{name}' is not UTF-8 text") from None
    return fields, files


def read_image(data: bytes, what: str = "image", mode: str = "RGB") -> Image.Image:
    """Uploaded bytes -> PIL image in ``mode`` (RGB; a mask keeps its alpha: RGBA); the pixel count is checked from
    the header before decoding. ``what`` names the upload in errors ("image", "mask")."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the {what} file is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}", param=what)
    if not data:
        raise ApiError(400, f"the {what} file is empty", param=what)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise ApiError(400, f"the {what} is {w}x{h} pixels; the limit is {MAX_INPUT_PIXELS} pixels",
                               param=what)
            if mode == "RGBA" and not im.has_transparency_data:
                raise ApiError(400, f"the {what} has no alpha channel (mode {im.mode}): OpenAI's convention marks "
                                    f"where to edit with fully transparent pixels (alpha 0); send a PNG with alpha",
                               param=what)
            return im.convert(mode)
    except ApiError:
        raise
    except Exception as e:  # PIL raises many types for corrupt or foreign files; all mean "not an image we read"
        why = "" if isinstance(e, UnidentifiedImageError) else f" ({type(e).__name__}: {e})"
        raise ApiError(400, f"the uploaded {what} file is not a readable image; send {', '.join(IMAGE_FORMATS)}"
                            f"{why}", param=what) from None


def read_mask(data: bytes, image: Image.Image) -> Image.Image:
    """An edit's mask upload -> RGBA PIL image, checked: alpha, the image's size, some pixel fully transparent."""
    mask = read_image(data, MASK_FIELD, "RGBA")
    if mask.size != image.size:
        raise ApiError(400, f"the mask is {mask.size[0]}x{mask.size[1]} but the image is {image.size[0]}x"
                            f"{image.size[1]}: send a mask of the image's size", param=MASK_FIELD)
    try:
        load_mask(mask)
    except InputError as e:
        raise ApiError(400, str(e), param=MASK_FIELD) from None
    return mask


def _edit_image(fields: dict[str, str], files: dict[str, list[bytes]]) -> bytes:
    """The one image file of an edit, under 'image' or OpenAI's 'image[]'; a clear error for several images or other
    files."""
    for name in files:
        if name not in (*IMAGE_FIELDS, MASK_FIELD):
            raise ApiError(422, f"unknown file field '{name}' (only 'image' and 'mask' are accepted)", param=name)
    for name in IMAGE_FIELDS:
        if name in fields:
            raise ApiError(400, f"'{name}' must be a file upload, not a text field", param="image")
    images = [data for name in IMAGE_FIELDS for data in files.get(name, [])]
    if not images:
        raise ApiError(422, "missing required field 'image' (the image file to edit)", param="image")
    if len(images) > 1:
        raise ApiError(400, f"got {len(images)} images; this server edits one image per request", param="image")
    return images[0]


def _edit_mask(fields: dict[str, str], files: dict[str, list[bytes]]) -> bytes | None:
    """The edit's mask file, if any: one file under 'mask'."""
    if MASK_FIELD in fields:
        raise ApiError(400, f"'{MASK_FIELD}' must be a file upload (a PNG with alpha), not a text field",
                       param=MASK_FIELD)
    masks = files.get(MASK_FIELD, [])
    if len(masks) > 1:
        raise ApiError(400, f"got {len(masks)} masks; an edit takes one", param=MASK_FIELD)
    return masks[0] if masks else None


async def read_edit_request(request: Request) -> tuple[EditRequest, Image.Image, Image.Image | None]:
    """(request, RGB image, RGBA mask or None) of a multipart edit."""
    _require_content_type(request, b"multipart/form-data", "an 'image' file and a 'prompt' field")
    body = await _read_body(request, MAX_FORM_BYTES, f"the request body (the image and the mask may be at most "
                                                     f"{MAX_UPLOAD_BYTES} bytes each)")
    fields, files = parse_multipart(body, request.headers.get("content-type", ""))
    image_data, mask_data = _edit_image(fields, files), _edit_mask(fields, files)
    req = validate_request(EditRequest, fields, strict=False)
    image = read_image(image_data)
    return req, image, read_mask(mask_data, image) if mask_data is not None else None
