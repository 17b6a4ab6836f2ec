"""The IPVS balancer: the adapter (balancer.py) driving ipvsadm through one command runner, the
parsers of its output, and its host checks (checks.py)."""
