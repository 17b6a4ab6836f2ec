"""`imagepipe web`: serve the web entrance (noVNC + a websocket to the balancer)."""

from __future__ import annotations

import typer

from imagepipe.app.web import serve_web
from imagepipe.cli.context import cli_context


def web(ctx: typer.Context) -> None:
    """Serve desktops in the browser on web.bind: noVNC's page and a websocket whose only
    target is HAProxy, which gets each browser user's address by the PROXY protocol. Stops
    on SIGTERM or Ctrl-C. Run by the imagepipe-web service; see docs/web.md."""
    serve_web(cli_context(ctx).settings())
