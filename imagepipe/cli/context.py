"""What every command gets from the root: the global options and the composition root's seam.

The root callback puts one CliContext on typer's context object; commands read it with
`cli_context(ctx)` and work on `cli.runtime(settings)` (imagepipe/app/bootstrap.py), which
opens only what the command uses. Tests and embedders pass `Adapters` to `main()` instead of
patching module globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from imagepipe.app.bootstrap import Adapters, Runtime

if TYPE_CHECKING:
    from imagepipe.config import Settings


@dataclass
class CliContext:
    config: Path | None = None
    adapters: Adapters = field(default_factory=Adapters)

    def settings(self) -> Settings:
        """The settings file the user chose (--config, $IMAGEPIPE_CONFIG, …), validated."""
        from imagepipe.config import load_settings

        return load_settings(self.config)

    def runtime(self, settings: Settings, *, manage_balancer: bool | None = None) -> Runtime:
        """The adapters for `settings`, opened as the command uses them; close it (`with`)."""
        return Runtime(settings, self.adapters, manage_balancer=manage_balancer)


def cli_context(ctx: typer.Context) -> CliContext:
    obj = ctx.find_object(CliContext)
    if obj is None:  # a command invoked without the root (not through main())
        obj = ctx.ensure_object(CliContext)
    return obj
