"""The libvirt/QEMU driver: the hypervisor adapter (hypervisor.py), its pure helpers, its warm
parents and its host checks (checks.py)."""
