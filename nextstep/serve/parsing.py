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

from ..errors import InputError
from ..pipeline import NextStepPipeline
from ..prompt import IMAGE_TAG
from .limits import (IMAGE_FORMATS, MAX_FORM_BYTES, MAX_INPUT_PIXELS, MAX_JSON_BYTES, MAX_SEED, MAX_SIZE,
                     MAX_UPLOAD_BYTES)
from .schemas import ApiError, EditRequest, GenerationRequest, validate_request


# ---- checking a parsed request -----------------------------------------------------------------------------------
def _parse_size(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", text)
    if not m:
        raise ApiError(400, f"{what} must look like WIDTHxHEIGHT (e.g. 512x512), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _check_size(w: int, h: int, multiple: int, what: str) -> None:
    for name, v in (("width", w), ("height", h)):
        if v < multiple or v % multiple:
            raise ApiError(400, f"{what} {w}x{h}: {name} must be a positive multiple of {multiple}")
        if v > MAX_SIZE:
            raise ApiError(400, f"{what} {w}x{h}: {name} {v} is over the limit of {MAX_SIZE} pixels per side")


def _check_text(name: str, text: str | None, tags_allowed: int, required: bool) -> None:
    """The schema bounds the length; this rejects a blank prompt and image tags the request has no image for."""
    if text is None:
        return
    if required and not text.strip():
        raise ApiError(400, f"{name} is empty")
    if text.count(IMAGE_TAG) > tags_allowed:
        raise ApiError(400, f"{name} may contain {IMAGE_TAG} at most {tags_allowed} time(s) (it marks the input "
                            f"image of an edit)")


def _output_size(req: GenerationRequest, multiple: int, default_size: tuple[int, int],
                 image: Image.Image | None) -> tuple[int, int]:
    """(width, height): the requested size, else an edit's input size, else the default; checked."""
    if req.size is not None:
        (w, h), what = _parse_size(req.size, "size"), "size"
    elif image is not None:
        (w, h), what = image.size, "the input image is"
        if w % multiple or h % multiple or w > MAX_SIZE or h > MAX_SIZE:
            raise ApiError(400, f"the input image is {w}x{h}: pass size (multiples of {multiple}, at most "
                                f"{MAX_SIZE} per side); the image is then resized to cover it and center-cropped")
    else:
        (w, h), what = default_size, "size"
    _check_size(w, h, multiple, what)
    return w, h


def build_job_kwargs(req: GenerationRequest, pipe: NextStepPipeline, default_size: tuple[int, int],
                     image: Image.Image | None = None) -> tuple[dict[str, Any], int]:
    """Check a parsed request (already within the schema's bounds) against the model; returns the pipeline keyword
    arguments and the seed used. Settings the request leaves out stay None, so the pipeline applies the model's
    defaults."""
    edit = image is not None
    _check_text("prompt", req.prompt, 1 if edit else 0, required=True)
    _check_text("negative_prompt", req.negative_prompt, 0, required=False)
    if req.response_format != "b64_json":
        raise ApiError(400, f"response_format {req.response_format!r} is not supported: this server keeps no "
                            f"files to link to; use 'b64_json'")
    try:  # the pipeline's own validation of the sampling settings, before the request is queued
        pipe.defaults.resolve(edit, sampler=req.sampler, num_inference_steps=req.steps,
                              guidance_scale=req.guidance_scale, time_shift=req.time_shift,
                              noise_level=req.noise_level,
                              image_guidance_scale=getattr(req, "image_guidance_scale", None))
    except InputError as e:
        raise ApiError(400, str(e)) from None
    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed
    w, h = _output_size(req, pipe.size_multiple, default_size, image)
    kwargs: dict[str, Any] = dict(prompt=req.prompt, negative_prompt=req.negative_prompt, height=h, width=w,
                                  num_images_per_prompt=req.n, num_inference_steps=req.steps,
                                  guidance_scale=req.guidance_scale, time_shift=req.time_shift, sampler=req.sampler,
                                  noise_level=req.noise_level, generator=torch.Generator().manual_seed(seed))
    if edit:
        kwargs.update(image=image, image_guidance_scale=req.image_guidance_scale)
    return kwargs, seed


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


async def read_json_request(request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
    body = await _read_body(request, MAX_JSON_BYTES, "the request body")
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object such as "
                            f'{{"prompt": "a red circle", "size": "256x256"}}') from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got a JSON {type(obj).__name__}")
    return validate_request(schema, obj, strict=True)


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """multipart/form-data -> (text fields, file fields), all in memory. A field given twice is an error."""
    ctype, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, f"send multipart/form-data with an 'image' file and a 'prompt' field, got content type "
                            f"{content_type or 'none'!r}")
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
    files: dict[str, bytes] = {}
    for headers, data in parts:
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if not name:
            raise ApiError(400, "malformed multipart body: a part has no name")
        if name in fields or name in files:
            raise ApiError(400, f"field '{name}' is given more than once")
        if b"filename" in disp:
            files[name] = bytes(data)
        else:
            try:
                fields[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, f"field '{name}' is not UTF-8 text") from None
    return fields, files


def read_image(data: bytes) -> Image.Image:
    """Uploaded bytes -> RGB PIL image; the pixel count is checked from the header before decoding."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the image file is {len(data)} bytes; the limit is {MAX_UPLOAD_BYTES}")
    if not data:
        raise ApiError(400, "the image file is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise ApiError(400, f"the image is {w}x{h} pixels; the limit is {MAX_INPUT_PIXELS} pixels")
            return im.convert("RGB")
    except ApiError:
        raise
    except Exception as e:  # PIL raises many types for corrupt or foreign files; all mean "not an image we read"
        why = "" if isinstance(e, UnidentifiedImageError) else f" ({type(e).__name__}: {e})"
        raise ApiError(400, f"the uploaded file is not a readable image; send {', '.join(IMAGE_FORMATS)}{why}") \
            from None


async def read_edit_request(request: Request) -> tuple[EditRequest, Image.Image]:
    body = await _read_body(request, MAX_FORM_BYTES, f"the request body (the image may be at most {MAX_UPLOAD_BYTES} "
                                                     f"bytes)")
    fields, files = parse_multipart(body, request.headers.get("content-type", ""))
    for name in files:
        if name != "image":
            raise ApiError(422, f"unknown file field '{name}' (only 'image' is accepted)")
    if "image" in fields:
        raise ApiError(400, "'image' must be a file upload, not a text field")
    if "image" not in files:
        raise ApiError(422, "missing required field 'image' (the image file to edit)")
    return validate_request(EditRequest, fields, strict=False), read_image(files["image"])
