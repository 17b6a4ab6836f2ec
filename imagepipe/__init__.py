"""imagepipe: build desktop images, version them, keep warm pools of desktops."""

__version__ = "0.1.0"
