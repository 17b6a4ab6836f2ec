"""Settings (imagepipe.yml) and pool files (pools/*.yml): loaded, validated, turned into
plain values (Settings, PoolSpec).

Every error names the file, the line and the key path, and says what was expected:

    pools/lab.yml:7: sessions.recycle_after: expected a duration such as 90s, 1m, 2h,
    1h30m or 1d, got '1 minute'

All errors of a file are reported together (one ConfigError, one line each, first line
first); nothing is changed when a file is bad.

The package by what it holds: values (value parsers with units), settings (imagepipe.yml),
pools (pool files), errors (pydantic's errors -> file:line: key: message). The YAML reader
(imagepipe/yamlsrc.py) and the name rules (imagepipe/names.py) sit beside the package, not in
it, because the image definitions and the registry read YAML and names too.
"""

from imagepipe.config.errors import ConfigIssues, Issue
from imagepipe.config.pools import MIN_MEMORY, PoolFile, load_pool_file, load_pools
from imagepipe.config.settings import (
    SETTINGS_NAME,
    SYSTEM_SETTINGS,
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

__all__ = [
    "MIN_MEMORY",
    "SETTINGS_NAME",
    "SYSTEM_SETTINGS",
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
