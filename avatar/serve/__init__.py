"""`avatar serve`: the local web app (see `app`)."""

from .app import App, make_server, serve

__all__ = ["App", "make_server", "serve"]
