"""Settings (imagepipe.yml) and pool files (pools/*.yml): loaded, validated, turned into
plain values (Settings, PoolSpec).

Every error names the file, the line and the key path, and says what was expected:

    pools/lab.yml:7: sessions.recycle_after: expected a duration such as 90s, 1m, 2h,
    1h30m or 1d, got '1 minute'

All errors of a file are reported together (one ConfigError, one line each, first line
first); nothing is changed when a file is bad.

The package by what it holds: values (value parsers with units), settings (imagepipe.yml),
pools (pool files), errors (a file's problems -> file:line: key: message). The YAML reader
(imagepipe/yamlsrc.py) and the name rules (imagepipe/names.py) sit beside the package, not in
it, because the image definitions and the registry read YAML and names too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagepipe.config.errors import ConfigIssues, Issue
    from imagepipe.config.pools import MIN_MEMORY, PoolFile, load_pool_file, load_pools
    from imagepipe.config.settings import (
        SETTINGS_NAME,
        SYSTEM_SETTINGS,
        BalancerInstance,
        BalancerSettings,
        HypervisorSettings,
        KeeperSettings,
        Settings,
        TlsSettings,
        WebSettings,
        find_settings_file,
        load_settings,
        parse_settings,
    )

# Each name is loaded from its module when first asked for, so reading imagepipe.yml (every
# command) does not also load the pool-file models and the pool model (`build` needs neither).
_HOMES = {
    "MIN_MEMORY": "imagepipe.config.pools",
    "SETTINGS_NAME": "imagepipe.config.settings",
    "SYSTEM_SETTINGS": "imagepipe.config.settings",
    "BalancerInstance": "imagepipe.config.settings",
    "BalancerSettings": "imagepipe.config.settings",
    "ConfigIssues": "imagepipe.config.errors",
    "HypervisorSettings": "imagepipe.config.settings",
    "Issue": "imagepipe.config.errors",
    "KeeperSettings": "imagepipe.config.settings",
    "PoolFile": "imagepipe.config.pools",
    "Settings": "imagepipe.config.settings",
    "TlsSettings": "imagepipe.config.settings",
    "WebSettings": "imagepipe.config.settings",
    "find_settings_file": "imagepipe.config.settings",
    "load_pool_file": "imagepipe.config.pools",
    "load_pools": "imagepipe.config.pools",
    "load_settings": "imagepipe.config.settings",
    "parse_settings": "imagepipe.config.settings",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    found = getattr(importlib.import_module(home), name)
    globals()[name] = found
    return found


__all__ = [
    "MIN_MEMORY",
    "SETTINGS_NAME",
    "SYSTEM_SETTINGS",
    "BalancerInstance",
    "BalancerSettings",
    "ConfigIssues",
    "HypervisorSettings",
    "Issue",
    "KeeperSettings",
    "PoolFile",
    "Settings",
    "TlsSettings",
    "WebSettings",
    "find_settings_file",
    "load_pool_file",
    "load_pools",
    "load_settings",
    "parse_settings",
]
