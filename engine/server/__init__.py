"""The OpenAI-compatible HTTP server (`python -m engine.serve`): see docs/SERVING.md.

    protocol.py   request checks and response shapes of the OpenAI API
    stops.py      stop strings over streamed text
    scheduler.py  the model worker thread behind a bounded queue
    app.py        the Starlette routes
    host.py       building a server from loaded models; running it in a thread (tests, benchmarks)
"""
