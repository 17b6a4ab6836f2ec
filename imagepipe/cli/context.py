"""What every command gets from the root: the global options and the composition root's seam.

The root callback puts one CliContext on typer's context object; commands read it with
`cli_context(ctx)`. Tests and embedders pass `Adapters` to `main()` instead of patching
module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import typer

from imagepipe.app.bootstrap import Adapters, Runtime, bootstrap
from imagepipe.config import Settings, load_settings


@dataclass
class CliContext:
    config: Path | None = None
    adapters: Adapters = field(default_factory=Adapters)

    def settings(self) -> Settings:
        """The settings file the user chose (--config, $IMAGEPIPE_CONFIG, …), validated."""
        return load_settings(self.config)

    def runtime(self, settings: Settings, *, manage_balancer: bool | None = None) -> Runtime:
        return bootstrap(settings, self.adapters, manage_balancer=manage_balancer)


def cli_context(ctx: typer.Context) -> CliContext:
    obj = ctx.find_object(CliContext)
    if obj is None:  # a command invoked without the root (not through main())
        obj = ctx.ensure_object(CliContext)
    return obj
