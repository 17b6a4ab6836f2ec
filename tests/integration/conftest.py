"""The real balancers' fixtures (tests/integration/balancers.py), for test_haproxy.py,
test_ipvs.py and the scenarios both run (test_balancer_pairs.py). The director test machine
boots once for the package."""

from tests.integration.balancers import director, haproxy_harness, ipvs_harness

__all__ = ["director", "haproxy_harness", "ipvs_harness"]
