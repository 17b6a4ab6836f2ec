"""`imagepipe images …`: the registered versions of each image, and their channels."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from imagepipe import schema
from imagepipe.app.bootstrap import Runtime
from imagepipe.cli.context import cli_context
from imagepipe.config import load_pools
from imagepipe.errors import BadInputError
from imagepipe.images.prune import choose, load_pool_records, versions_in_use
from imagepipe.images.records import VersionRecord
from imagepipe.images.registry import Registry, check_image_name
from imagepipe.names import channel_error, shown
from imagepipe.units import format_size

app = typer.Typer(help="Registered image versions and channels.", no_args_is_help=True)

_JSON = typer.Option(False, "--json", help="Print JSON.")


@app.callback()
def images() -> None:
    """Registered image versions (a git repository) and channels such as latest and stable."""


@contextmanager
def _runtime(ctx: typer.Context) -> Iterator[Runtime]:
    """The command's runtime, its registry checked to be one; closed at the end."""
    cli = cli_context(ctx)
    with cli.runtime(cli.settings()) as runtime:
        runtime.registry.check_readable()
        yield runtime


@contextmanager
def _registry(ctx: typer.Context) -> Iterator[Registry]:
    with _runtime(ctx) as runtime:
        yield runtime.registry


def _known(registry: Registry, image: str) -> None:
    check_image_name(image)  # before any file is looked at: "" is not "all images"
    if image not in registry.images():
        known = ", ".join(registry.images()) or "none yet"
        raise BadInputError(f"unknown image {image!r} (registered images: {known})")


def _channels_of(registry: Registry, image: str) -> dict[int, list[str]]:
    by_version: dict[int, list[str]] = {}
    for name, history in sorted(registry.channels(image).items()):
        by_version.setdefault(history[-1].version, []).append(name)
    return by_version


def _doc(record: VersionRecord, channels: list[str]) -> dict[str, Any]:
    return {**schema.dump(record), "channels": channels}


@app.command("list")
def list_(
    ctx: typer.Context,
    image: str | None = typer.Argument(None, help="Only this image."),
    as_json: bool = _JSON,
) -> None:
    """Every version of every image (or of IMAGE), with status and channels."""
    docs = []
    table = Table("image", "version", "status", "channels", "created", "size", "fingerprint")
    with _registry(ctx) as registry:
        if image is not None:
            _known(registry, image)
        for name in [image] if image is not None else registry.images():
            channels = _channels_of(registry, name)
            for record in registry.versions(name):
                on = channels.get(record.version, [])
                docs.append(_doc(record, on))
                size = sum(a.size for a in record.artifacts)
                table.add_row(
                    name,
                    f"v{record.version}",
                    record.status.value,
                    ",".join(on),
                    record.created_at,
                    format_size(size),
                    record.fingerprint[:12],
                )
    if as_json:
        typer.echo(json.dumps(docs, indent=2))
    elif not docs:
        typer.echo("no versions registered yet (imagepipe build IMAGE)")
    else:
        Console().print(table)


@app.command()
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="IMAGE, IMAGE@7, IMAGE@v7 or IMAGE@CHANNEL."),
    as_json: bool = _JSON,
) -> None:
    """One version in full: provenance, artifacts with checksums, boot information."""
    image, _, which = ref.partition("@")
    with _registry(ctx) as registry:
        _known(registry, image)
        record = registry.resolve(image, which or None)
        doc = _doc(record, _channels_of(registry, image).get(record.version, []))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    for key in (
        "image",
        "version",
        "status",
        "status_reason",
        "channels",
        "created_at",
        "fingerprint",
        "builder",
        "packer_version",
        "source_commit",
        "source_dirty",
        "parent",
        "directory",
        "disk",
        "kernel",
        "initrd",
        "cmdline",
        "vm",
        "snapshot",
    ):
        if doc.get(key) not in (None, [], ""):
            typer.echo(f"{key:15} {doc[key]}")
    for artifact in record.artifacts:
        typer.echo(
            f"{'artifact':15} {artifact.name}  {format_size(artifact.size)}  "
            f"sha256:{artifact.sha256}"
        )


@app.command()
def promote(
    ctx: typer.Context,
    image: str = typer.Argument(...),
    version: str = typer.Argument(..., help="7 or v7."),
    channel: str = typer.Option(..., "--channel", help="e.g. stable."),
    as_json: bool = _JSON,
) -> None:
    """Point CHANNEL of IMAGE at VERSION (pools on that channel roll out to it)."""
    with _registry(ctx) as registry:
        _known(registry, image)
        _check_channel(channel)
        record = registry.promote(image, registry.resolve(image, version).version, channel)
    _moved(image, channel, record, as_json)


@app.command()
def rollback(
    ctx: typer.Context,
    image: str = typer.Argument(...),
    channel: str = typer.Option(..., "--channel"),
    as_json: bool = _JSON,
) -> None:
    """Point CHANNEL back at the version it held before its current one."""
    with _registry(ctx) as registry:
        _known(registry, image)
        _check_channel(channel)
        record = registry.rollback(image, channel)
    _moved(image, channel, record, as_json)


@app.command()
def revoke(
    ctx: typer.Context,
    image: str = typer.Argument(...),
    version: str = typer.Argument(...),
    reason: str = typer.Option(..., "--reason", help="Why, for the record."),
    as_json: bool = _JSON,
) -> None:
    """Mark VERSION unusable; channels on it move back to their previous version."""
    with _registry(ctx) as registry:
        _known(registry, image)
        record = registry.revoke(image, registry.resolve(image, version).version, reason)
    if as_json:
        typer.echo(json.dumps(_doc(record, [])))
    else:
        typer.echo(f"revoked {record.label}: {reason}")


@app.command()
def prune(
    ctx: typer.Context,
    keep: int = typer.Option(..., "--keep", help="Newest active versions to keep per image."),
    image: str | None = typer.Argument(None, help="Only this image."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would go."),
    as_json: bool = _JSON,
) -> None:
    """Remove old versions' artifacts from the image store. Never one a channel, a pool or a
    running clone uses."""
    if keep < 0:
        raise BadInputError(f"--keep must be 0 or more, got {keep}")
    with _runtime(ctx) as runtime:
        docs = _prune(runtime, keep, image, dry_run, as_json)
    if as_json:
        typer.echo(json.dumps(docs, indent=2))


def _prune(
    runtime: Runtime,
    keep: int,
    image: str | None,
    dry_run: bool,
    as_json: bool,
) -> list[dict[str, Any]]:
    registry, settings = runtime.registry, runtime.settings
    if image is not None:
        _known(registry, image)
    pools = load_pools([settings.pools_dir]) if settings.pools_dir.exists() else []
    records = load_pool_records(runtime.store_reader, pools)
    docs = []
    for name in [image] if image is not None else registry.images():
        used = versions_in_use(registry, name, pools, records)
        for choice in choose(registry.versions(name), registry.channels(name), used, keep):
            if choice.remove and not dry_run:
                registry.prune(name, choice.record.version, f"prune --keep {keep}")
            docs.append(
                {
                    "image": name,
                    "version": choice.record.version,
                    "removed": choice.remove and not dry_run,
                    "reason": choice.reason,
                }
            )
            if not as_json:
                verb = ("would remove" if dry_run else "removed") if choice.remove else "kept"
                typer.echo(f"{verb} {name} v{choice.record.version} ({choice.reason})")
    return docs


def _check_vm_name(vm: str) -> None:
    """A VirtualBox VM name or UUID: 1 to 255 characters, no control characters."""
    if not vm.strip():
        raise BadInputError("--from-vm: the VM name is empty")
    if len(vm) > 255 or not vm.isprintable():
        raise BadInputError(
            f"--from-vm: {shown(vm)} is not a VM name (1 to 255 printable characters)"
        )


def _check_channel(channel: str) -> None:
    error = channel_error(channel)
    if error is not None:
        raise BadInputError(f"--channel: {error}")


@app.command("import")
def import_(
    ctx: typer.Context,
    image: str = typer.Argument(..., help="The image to add a version to."),
    from_vm: str | None = typer.Option(None, "--from-vm", help="A VirtualBox VM with a snapshot."),
    from_domain: str | None = typer.Option(
        None, "--from-domain", help="A powered-off libvirt domain (its disk is frozen)."
    ),
    as_json: bool = _JSON,
) -> None:
    """Register a VirtualBox VM's current snapshot (--from-vm), or a powered-off libvirt
    domain's disk (--from-domain: frozen into the image store; the domain goes on on a new
    overlay), as a new version of IMAGE. Keep the base powered off: while it runs, no desktop
    is made from the version. Importing the same snapshot or disk again changes nothing."""
    check_image_name(image)
    if (from_vm is None) == (from_domain is None):
        raise BadInputError("give --from-vm VM (VirtualBox) or --from-domain DOMAIN (libvirt)")
    if from_domain is not None:
        _import_domain(ctx, image, from_domain, as_json)
        return
    assert from_vm is not None
    from imagepipe.app.image_import import import_vm

    _check_vm_name(from_vm)
    with _runtime(ctx) as runtime:
        found = import_vm(runtime, image, from_vm)
    record = found.record
    if as_json:
        typer.echo(json.dumps(_doc(record, []), sort_keys=True))
        return
    typer.echo(f"{record.label}: VM {found.vm}, snapshot {found.snapshot_name} ({found.snapshot})")


def _import_domain(ctx: typer.Context, image: str, domain: str, as_json: bool) -> None:
    from imagepipe.app.image_import import import_domain

    _check_vm_name(domain)
    with _runtime(ctx) as runtime:
        imported = import_domain(runtime, image, domain)
    record = imported.record
    if as_json:
        doc = {**_doc(record, []), "overlay": str(imported.overlay) if imported.overlay else None}
        typer.echo(json.dumps(doc, sort_keys=True))
    elif imported.overlay is None:
        typer.echo(f"{record.label}: domain {domain}'s disk is already this version")
    else:
        typer.echo(
            f"{record.label}: domain {domain}'s disk, frozen in {record.directory}; the domain "
            f"goes on on {imported.overlay}"
        )


def _moved(image: str, channel: str, record: VersionRecord, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"image": image, "channel": channel, "version": record.version}))
    else:
        typer.echo(f"{image} {channel} -> v{record.version}")
