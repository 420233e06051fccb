"""OpenAI-compatible HTTP server with persistent contexts (``retrieval-attention serve``).

``create_app(model, tokenizer, config, ...)`` builds the FastAPI app for a loaded model; ``ServerThread`` runs
it on a background thread. See ``retrieval_attention/server/README.md`` for the API. FastAPI and uvicorn are
the ``server`` extra (``pip install retrieval-attention[server]``), imported only when these are used.
"""

__all__ = ["create_app", "ServerThread"]


def __getattr__(name):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
