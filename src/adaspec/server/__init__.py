"""An OpenAI-compatible HTTP server over one Engine (`adaspec serve`; see docs/server.md).

    from adaspec.server import ServerSettings, create_app
    app = create_app(adaspec.load("tiny", "tiny-draft"), ServerSettings(queue_size=8))

Needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""

from adaspec.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
