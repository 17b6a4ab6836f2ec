"""One exception hierarchy; the CLI turns each into one line on stderr and an exit code.

Exit codes (documented in the README):
  2  bad input or configuration: nothing was changed
  3  the environment is missing something (a program, a daemon, a permission)
  4  an operation failed while running
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_FAILED = 4


class ImagepipeError(Exception):
    """Root of every error imagepipe raises on purpose."""

    exit_code = EXIT_FAILED


class BadInputError(ImagepipeError):
    """The user asked for something impossible or misspelt; nothing was changed."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """A configuration file is wrong. The message names file, line and key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        where = ""
        if file:
            where = file if line is None else f"{file}:{line}"
        parts = [p for p in (where, key) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.file = file
        self.line = line
        self.key = key
        self.detail = message


class EnvironmentMissingError(ImagepipeError):
    """A program, daemon or permission imagepipe needs is not there."""

    exit_code = EXIT_ENVIRONMENT


class OperationFailedError(ImagepipeError):
    """Something imagepipe tried did not work."""

    exit_code = EXIT_FAILED


class CommandError(OperationFailedError):
    """An external program exited non-zero. Carries argv, exit code and stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-1] if stderr.strip() else "no error output"
        super().__init__(f"{argv[0]} exited with {returncode}: {tail}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr


# --- hypervisor errors: typed so the executor knows what to retry -----------------------


class HypervisorError(OperationFailedError):
    """Base of errors raised by a hypervisor adapter."""


class CloneNotFoundError(HypervisorError):
    """No clone (domain, VM) of that name exists at all. Final: never retried; for delete
    and stop it means the goal is already reached. Never raised for a name that exists but
    is not imagepipe's clone (NotOurCloneError) or for a missing base (BaseMissingError)."""


class BusyError(HypervisorError):
    """The object is locked or busy right now. Transient: retry with backoff."""


class HypervisorUnavailableError(BusyError):
    """The hypervisor's daemon does not answer right now (libvirtd restarting or stopped):
    the call never reached it or its answer was lost. Transient like BusyError, and never the
    clone's fault; the adapter reconnects on the next call."""


class InvalidStateError(HypervisorError):
    """The operation does not fit the object's current state (e.g. start a running VM)."""


class FatalHypervisorError(HypervisorError):
    """The hypervisor refused in a way retrying will not fix."""


class NotOurCloneError(FatalHypervisorError):
    """A domain/VM of that name exists but imagepipe did not make it (no imagepipe metadata),
    or it is another pool's clone. It is never touched, and an operation on it never counts
    as done: not even a delete or a stop."""


class BaseMissingError(FatalHypervisorError):
    """The base image of a version (disk file, kernel, VM, snapshot) is gone, so no clone of
    that version can be made or rebuilt. The message names what is missing and the fix."""


class DisplayInUseError(FatalHypervisorError):
    """The clone's display port (VNC/RDP) is held by another program or a running clone."""


# --- balancer errors ---------------------------------------------------------------------


class BalancerError(OperationFailedError):
    """Base of errors raised by a balancer adapter."""


class BackendNotFoundError(BalancerError):
    """The balancer has no such backend."""


class BackendInUseError(BalancerError):
    """The backend still has connections, so it is not removed; drain it and retry later."""


# --- the state store ---------------------------------------------------------------------


class FencedError(ImagepipeError):
    """A write carried a fencing token (the leader epoch) that is no longer the store's:
    another keeper was elected meanwhile. Nothing of the write was committed; the keeper
    that gets this is no longer the leader and must stop acting."""

    exit_code = EXIT_FAILED

    def __init__(self, epoch: int, current: int | None, holder: str | None) -> None:
        now = "no leader" if current is None else f"epoch {current}, held by {holder}"
        super().__init__(
            f"write refused: this keeper's leader epoch {epoch} is no longer current ({now}); "
            "nothing was written"
        )
        self.epoch = epoch
        self.current = current
        self.holder = holder


class StoreUnavailableError(OperationFailedError):
    """The state store cannot be reached (the database server is down or unreachable).
    Nothing was written; the same call may work once it answers again."""
