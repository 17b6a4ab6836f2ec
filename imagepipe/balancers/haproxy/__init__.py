"""The HAProxy balancer: the adapter (balancer.py) over its configuration, process, runtime API
and admin socket, and its host checks (checks.py)."""
