"""HTTP server for NextStep: an OpenAI-style images API, a live-preview stream and a one-page UI.

Needs the ``serve`` extra (``pip install 'nextstep[serve]'``). Entry points live in ``nextstep.serve.app``:
``create_app(pipe)`` builds the ASGI app around a loaded ``NextStepPipeline``; ``serve(...)`` loads a model and
runs it under uvicorn (``nextstep serve`` on the command line). Importing this package imports nothing heavy.
"""
