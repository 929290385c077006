"""The server's limits, each a named constant: every one is enforced with a 4xx JSON error that names it, and
``GET /health`` lists them. Sampling settings keep their own bounds (``nextstep.settings``); the limits here on
settings (steps, prompt length) are operational, applied on top against requests that would hold the worker."""

from __future__ import annotations

MAX_SIZE = 512  # pixels per side
MAX_N = 4  # images per request
MAX_STEPS = 100  # flow steps per image token: each costs a head pass per token (the settings allow more)
MAX_SEED = 2**32 - 1  # exact in JavaScript numbers
MAX_PROMPT_CHARS = 2000  # prompt and negative prompt, each
MAX_JSON_BYTES = 64 * 1024  # JSON request bodies
MAX_JSON_DEPTH = 8  # nesting of JSON arrays and objects (requests are flat objects; deep ones exhaust the parser)
MAX_LABEL_CHARS = 256  # short text fields the server reads and ignores (model, user, quality, ...)
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound on partial_images (stream=true: previews at evenly spaced image tokens)
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # the edit input image file (and its mask file, each)
MAX_FORM_BYTES = 2 * MAX_UPLOAD_BYTES + 64 * 1024  # whole multipart body: the image, its mask and the text fields
MAX_INPUT_PIXELS = 4096 * 4096  # decoded input image (checked from the header, before decoding)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # decoders allowed for uploads (no EPS/PDF helpers)
QUEUE_SIZE = 8  # requests waiting behind the running one; more get 429
MAX_BATCH = 8  # images one pipeline call draws for queued requests merged into a batch (a larger request runs alone)
PROMPT_BUCKET = 32  # reproducible mode: prompt rows are left-padded to a multiple of this many tokens
BATCH_WAIT_S = 0.05  # how long a request that finds the worker idle waits for compatible ones to share its call
RETRY_AFTER_S = 5  # the Retry-After header of a 429: OpenAI's clients wait this long before retrying
PREVIEWS_PER_IMAGE = 16  # stream previews spread over the image tokens (each costs one VAE decode)
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there

# the ``type`` of the JSON error body for each HTTP status the server answers with
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
               422: "validation_error", 429: "queue_full", 500: "server_error", 503: "cancelled"}
