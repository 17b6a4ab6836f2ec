"""The web entrance: noVNC in the browser, a websocket to the balancer (docs/web.md)."""
