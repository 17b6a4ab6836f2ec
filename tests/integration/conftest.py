"""The real balancers' fixtures (tests/integration/balancers.py), for test_haproxy.py,
test_ipvs.py and the scenarios both run (test_balancer_pairs.py). The IPVS director test
machine's fixtures (`director`, `ipvs_harness`) are in tests/conftest.py: it boots once per
session, for these and for tests/multihost/test_multihost_ipvs.py."""

from tests.integration.balancers import haproxy_harness

__all__ = ["haproxy_harness"]
