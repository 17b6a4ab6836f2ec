"""`imagepipe doctor`: check this host before (or when) `imagepipe keep` misbehaves.

One line per check (ok, warn or FAIL, what was found, what to do); `--json` prints a stable
list of {check, status, detail, fix}. Exit code 0 without a FAIL, 3 with one. Changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import typer

from imagepipe.cli.context import cli_context
from imagepipe.doctor import Check, Status, failed, run_checks
from imagepipe.errors import EXIT_ENVIRONMENT


def doctor(
    ctx: typer.Context,
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list of {check, status, detail, fix}."
    ),
) -> None:
    """Check settings, pool files, Packer, the hypervisor, the balancer, the state database
    and the registry on this host, without changing anything.

    Exit code 0 when nothing failed (warnings allowed), 3 when something is missing.
    """
    checks = run_checks(cli_context(ctx).config)
    typer.echo(to_json(checks) if as_json else render(checks))
    if failed(checks):
        raise typer.Exit(code=EXIT_ENVIRONMENT)


def render(checks: Sequence[Check]) -> str:
    """`ok    packer       packer 1.6.6; ...` and, for warn/FAIL, `→ what to do`."""
    width = max(len(c.check) for c in checks)
    lines = []
    for check in checks:
        detail = check.detail.replace("\n", "\n" + " " * (width + 8))
        fix = f"  → {check.fix}" if check.fix else ""
        lines.append(f"{check.status.value:<4}  {check.check:<{width}}  {detail}{fix}")
    counts = {s: sum(c.status is s for c in checks) for s in Status}
    lines.append(f"{counts[Status.OK]} ok, {counts[Status.WARN]} warn, {counts[Status.FAIL]} FAIL")
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps([asdict(c) for c in checks], indent=2, sort_keys=True)
