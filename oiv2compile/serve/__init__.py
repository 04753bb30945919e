"""`oiv2compile serve`: an OpenAI-compatible HTTP server over the continuous-batching scheduler.

Needs the `serve` extra (fastapi, uvicorn, prometheus_client): `pip install 'oiv2compile[serve]'`.
"""

from oiv2compile.serve.app import create_app, render_chat, serve

__all__ = ["create_app", "render_chat", "serve"]
