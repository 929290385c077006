"""HTTP server for NextStep: an OpenAI-style images API, a live-preview stream and a one-page UI.

Needs the ``serve`` extra (``pip install 'nextstep[serve]'``). ``nextstep.serve.routes.create_app(pipe)`` builds the
ASGI app around a loaded ``NextStepPipeline`` (its docstring lists the endpoints and errors);
``nextstep.serve.runner.serve(...)`` loads a model and runs it under uvicorn (``nextstep serve`` on the command line).
The other modules: ``limits`` (named limits), ``schemas`` (request models, the JSON error), ``parsing`` (reading and
checking requests), ``worker`` (the generation thread and its queue), ``responses`` (JSON or Server-Sent Events),
``security`` (Host and Origin checks, the API key).
Importing this package only checks that the extra is installed, so a missing package is named with the fix.
"""

import importlib.util

for _module in ("fastapi", "pydantic", "python_multipart", "uvicorn"):
    if importlib.util.find_spec(_module) is None:
        raise ImportError(f"the server needs the 'serve' extra: pip install 'nextstep[serve]' (no module named "
                          f"{_module!r})")
