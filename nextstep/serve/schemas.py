"""What goes over the wire: the request models (their bounds are the settings' own and the server's limits, so the
OpenAPI schema shows them) and the JSON error every failure is answered with."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from ..settings import SPECS
from .limits import ERROR_TYPES, MAX_LABEL_CHARS, MAX_N, MAX_PARTIAL_IMAGES, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS

# the server's operational limits on settings, on top of their own bounds (limits.py says why)
OPERATIONAL = {"num_inference_steps": {"le": MAX_STEPS}, "negative_prompt": {"max_length": MAX_PROMPT_CHARS}}

# pydantic error types that mean "the right type, outside the limits": a 400, like every other limit; the rest
# (missing, unknown or wrongly typed fields) are a 422
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than_equal", "string_too_short", "string_too_long"}


class ApiError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with an HTTP status:
    ``param`` names the request field at fault and ``code`` is a stable machine-readable reason (each None when
    there is none), so OpenAI's clients raise their usual exception types with these attributes filled in."""

    def __init__(self, status: int, message: str, kind: str | None = None, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind or ERROR_TYPES.get(status, "error")
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class OpenAIFields(BaseModel):
    """Fields of OpenAI's images API that mean nothing to this server, accepted so OpenAI's clients work unchanged.
    ``model``, ``quality``, ``style``, ``user``, ``safety_identifier``, ``moderation`` and ``complexity`` are read and
    ignored (one model per server; no moderation or per-user accounting here); ``output_compression`` is
    range-checked and ignored (PNG is lossless). ``stream`` asks for OpenAI's event stream with ``partial_images``
    partial images (``parsing.stream_partials``). ``background`` and ``output_format`` are checked against what the
    server does (``parsing``)."""

    model: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    quality: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    style: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    user: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    safety_identifier: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    moderation: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    complexity: str | None = Field(None, max_length=MAX_LABEL_CHARS)
    output_compression: int | None = Field(None, ge=0, le=100)
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)  # with stream: partial images to send
    background: str | None = Field(None, max_length=MAX_LABEL_CHARS)  # "auto" or "opaque": the images have no alpha
    output_format: str | None = Field(None, max_length=MAX_LABEL_CHARS)  # "png" only
    stream: bool | None = None  # true: OpenAI's event stream (the /stream routes send this server's own events)


class _Request(OpenAIFields):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    n: int | None = Field(1, ge=1, le=MAX_N)
    size: str | None = None  # "WxH", or "auto" (as when left out)
    response_format: str | None = None  # "b64_json" (as when left out)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    fast: bool | None = None  # sample with the server's distilled few-step head (``nextstep serve --head DIR``)
    lora: str | None = Field(None, min_length=1, max_length=64)  # a LoRA adapter the server loaded (--lora NAME=DIR)


def _setting_fields(edit_only: bool) -> dict[str, Any]:
    """The request fields of the sampling settings (``nextstep.settings``): their bounds, then the server's
    operational limits on top (``OPERATIONAL``); a setting left out (None) takes the model's default."""
    fields = {}
    for s in SPECS:
        if s.api is None or s.edit_only != edit_only:
            continue
        bounds = {} if s.lo is None else {"gt" if s.lo_open else "ge": s.lo}
        bounds.update({} if s.hi is None else {"le": s.hi}, **OPERATIONAL.get(s.name, {}))
        fields[s.api] = (s.type | None, Field(None, description=s.help, **bounds))
    return fields


GenerationRequest = create_model(
    "GenerationRequest", __base__=_Request, __module__=__name__, **_setting_fields(edit_only=False),
    __doc__="""Text to image. Types are checked strictly for JSON (``"2"`` is not an int); multipart text is converted.
    Sampling settings left out take the model's defaults (``pipe.defaults``, edit settings for edits).""")
EditRequest = create_model(
    "EditRequest", __base__=GenerationRequest, __module__=__name__, **_setting_fields(edit_only=True),
    input_fidelity=(str | None, Field(None, max_length=MAX_LABEL_CHARS)),
    __doc__="Image editing: adds the image guidance scale (and OpenAI's ``input_fidelity``, read and ignored).")


RequestModel = TypeVar("RequestModel", bound=GenerationRequest)


def validate_request(schema: type[RequestModel], data: dict[str, Any], *, strict: bool) -> RequestModel:
    """Fields -> request, or ApiError: 422 when a field is missing, unknown or of the wrong type, else 400 when a
    value is outside the limits (the message gives the accepted range)."""
    try:
        return schema.model_validate(data, strict=strict)
    except ValidationError as err:
        errors = err.errors()
        wrong = [e for e in errors if e["type"] not in BOUND_ERRORS]
        if wrong:  # alone: a value of the wrong type has no range to report
            raise ApiError(422, "; ".join(_type_message(e, schema) for e in wrong),
                           param=_field_name(wrong[0])) from None
        raise ApiError(400, "; ".join(_bound_message(e, schema) for e in errors), param=_field_name(errors[0])) \
            from None


def _field_name(error: dict[str, Any]) -> str:
    return ".".join(str(p) for p in error["loc"]) or "body"


def _type_message(error: dict[str, Any], schema: type[BaseModel]) -> str:
    name = _field_name(error)
    if error["type"] == "missing":
        return f"missing required field '{name}'"
    if error["type"] == "extra_forbidden":
        return f"unknown field '{name}' (accepted: {', '.join(schema.model_fields)})"
    got = repr(error.get("input"))
    return f"field '{name}': {error['msg']} (got {got[:60] + '...' if len(got) > 60 else got})"


def _bound_message(error: dict[str, Any], schema: type[BaseModel]) -> str:
    name, value = _field_name(error), error["input"]
    if error["type"] == "string_too_short":
        return f"{name} is empty"
    if error["type"] == "string_too_long":
        return f"{name} is {len(value)} characters long; the limit is {error['ctx']['max_length']}"
    return f"{name} must be in {_interval(schema.model_fields[name])}, got {value}"


def _interval(info: FieldInfo) -> str:
    """A field's numeric bounds as ``[lo, hi]``, or ``(lo, hi]`` when the lower bound is excluded."""
    bounds = {key: getattr(m, key) for m in info.metadata for key in ("ge", "gt", "le") if hasattr(m, key)}
    lo = bounds["gt"] if "gt" in bounds else bounds["ge"]
    return f"{'(' if 'gt' in bounds else '['}{_number(lo)}, {_number(bounds['le'])}]"


def _number(v: float) -> str:
    """Short for floats (30.0 -> 30), exact for ints (MAX_SEED is ten digits)."""
    return f"{v:g}" if isinstance(v, float) else str(v)
