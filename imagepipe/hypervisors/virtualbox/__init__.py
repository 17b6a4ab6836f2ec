"""The VirtualBox driver (pyvbox): the hypervisor adapter (hypervisor.py) over one machine driver
(driver.py), its pure helpers (facts.py), events, warm parents and host checks (checks.py)."""
