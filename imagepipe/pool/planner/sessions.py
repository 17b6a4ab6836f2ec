"""Whether somebody is on a clone: a live session, or one whose users read did not answer.

The rules for one clone (clones.py) start from these; `imagepipe status` and the teardown of
a pool ask them too.
"""

from __future__ import annotations

from imagepipe.pool.model import CloneRecord, CloneState, GuestSession, PoolSpec

DISCONNECTED = CloneState.DISCONNECTED  # read per clone: named once (slow through its Enum)
WITH_SESSION = (CloneState.IN_USE, CloneState.DISCONNECTED, CloneState.RETIRING)


def session_live(
    spec: PoolSpec, session: GuestSession, record: CloneRecord | None, now: float
) -> bool:
    """Somebody is on the clone: a client is connected, or a user is logged in and
    disconnected less than spec.disconnect_timeout ago. Such a clone is never reset,
    deleted, stopped or suspended (except a retiring clone past the drain deadline)."""
    if session.client is not None:
        return True
    if not session.users:
        return False
    disconnected_at = now
    if record is not None and record.state is DISCONNECTED:
        disconnected_at = record.since
    return now - disconnected_at < spec.disconnect_timeout


def session_unread(
    spec: PoolSpec, session: GuestSession, record: CloneRecord | None, now: float
) -> bool:
    """Whether the clone's session hangs on a users read that did not answer in time: no
    client connected, and the store had somebody on it (in use, retiring, or disconnected
    within spec.disconnect_timeout). Whether that user is still logged in is unknown, so
    nothing is decided about the clone until the guest answers."""
    if not session.users_unread or session.client is not None or record is None:
        return False
    if record.state is DISCONNECTED:
        return now - record.since < spec.disconnect_timeout
    return record.state in WITH_SESSION
