"""How long a sandbox lives: the TTL and lease rules in one place (issue 13 item 5).

Every sandbox has a hard deadline, its TTL (``expires_at``), and usually a lease: a shorter
deadline (``lease_expires_at``) pushed forward by every call that names the sandbox and by the
SDK's heartbeat. Whoever reaches either deadline first ends the sandbox. These rules used to be
written four times (the Scheduler's limits and liveness, the Worker's deadlines and reaper, the
SDK's heartbeat interval, the GEM table's idle TTL and lease margin); they now live here, as
pure functions of a record and a time, so they are tested with a fake clock and no Ray.

- :class:`Lifetime`: the platform's TTL and lease limits (from
  :class:`~rock_serve.config.ServerArgs`): what a create asks for -> its ttl and lease (or
  ``InvalidRequest``), its deadlines, whether a record is live, why it is reaped, and how often
  a client renews it.
- :class:`IdleLifetime`: the rule of objects that end when unused (the GEM env instances):
  idle deadline, reap cadence and the lease of the sandbox behind them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from rock_serve.errors import InvalidRequest

if TYPE_CHECKING:
    from rock_serve.config import ServerArgs

__all__ = [
    "MIN_RENEW_INTERVAL",
    "IdleLifetime",
    "Lifetime",
    "ReapReason",
    "renew_interval",
]

#: Shortest time between two renewals of a lease by a client, whatever the lease.
MIN_RENEW_INTERVAL = 0.2
#: Share of a lease after which a client renews it (three beats per lease).
RENEW_SHARE = 1 / 3

#: Why the reaper removes a sandbox.
ReapReason = Literal["ttl_expired", "lease_expired"]


class _Deadlines(Protocol):
    """What the rules read of a sandbox record (``SandboxRecord`` has these)."""

    @property
    def expires_at(self) -> float | None: ...

    @property
    def lease_expires_at(self) -> float | None: ...


def renew_interval(lease_seconds: float | None) -> float | None:
    """Seconds between two renewals of a lease (a third of it, at least
    :data:`MIN_RENEW_INTERVAL`), or None when there is no lease to renew.
    """
    if lease_seconds is None:
        return None
    return max(MIN_RENEW_INTERVAL, lease_seconds * RENEW_SHARE)


@dataclass(frozen=True, slots=True)
class Lifetime:
    """The TTL and lease rules of one platform."""

    default_ttl_seconds: float
    max_ttl_seconds: float
    default_lease_seconds: float | None
    max_lease_seconds: float

    @classmethod
    def of(cls, args: ServerArgs) -> Lifetime:
        """The rules set by a platform's args."""
        return cls(
            default_ttl_seconds=args.default_ttl_seconds,
            max_ttl_seconds=args.max_ttl_seconds,
            default_lease_seconds=args.default_lease_seconds,
            max_lease_seconds=args.max_lease_seconds,
        )

    # ------------------------------------------------------------------ admission

    def ttl(self, requested: float | None) -> float:
        """The TTL of a create that asked for ``requested`` (None: the default).

        Raises:
            InvalidRequest: over ``max_ttl_seconds``.
        """
        ttl = self.default_ttl_seconds if requested is None else requested
        if ttl > self.max_ttl_seconds:
            raise InvalidRequest(f"ttl_seconds {ttl} is over the limit of {self.max_ttl_seconds}")
        return ttl

    def check_lease(self, requested: float | None) -> None:
        """Refuse a requested lease over the limit (the default lease is always allowed).

        Raises:
            InvalidRequest: over ``max_lease_seconds``.
        """
        if requested is not None and requested > self.max_lease_seconds:
            raise InvalidRequest(
                f"lease_seconds {requested} is over the limit of {self.max_lease_seconds}"
            )

    def admit(self, ttl_seconds: float | None, lease_seconds: float | None) -> float:
        """Check a create's (or fork's) TTL and lease; returns its TTL.

        Raises:
            InvalidRequest: either is over its limit.
        """
        ttl = self.ttl(ttl_seconds)
        self.check_lease(lease_seconds)
        return ttl

    def lease(self, requested: float | None) -> float | None:
        """The lease of a new sandbox: what it asked for, else the platform's default (None:
        no lease, the TTL only).
        """
        return self.default_lease_seconds if requested is None else requested

    @staticmethod
    def fork_lease(requested: float | None, parent: float | None) -> float | None:
        """The lease of a fork's child: what the fork asked for, else its parent's (which may
        be none).
        """
        return parent if requested is None else requested

    # ------------------------------------------------------------------ deadlines

    @staticmethod
    def expires_at(created_at: float, ttl: float) -> float:
        """The hard deadline of a sandbox made at ``created_at`` with ``ttl``."""
        return created_at + ttl

    @staticmethod
    def lease_deadline(lease_seconds: float | None, now: float) -> float | None:
        """The lease deadline after a renewal (a call, a heartbeat) at ``now``."""
        return None if lease_seconds is None else now + lease_seconds

    @staticmethod
    def live(record: _Deadlines, now: float) -> bool:
        """Whether a record is within its TTL (the registry hides the others)."""
        return record.expires_at is None or record.expires_at > now

    @staticmethod
    def reap_reason(record: _Deadlines, now: float) -> ReapReason | None:
        """Why the reaper removes this sandbox at ``now`` (the TTL wins), or None."""
        if record.expires_at is not None and record.expires_at <= now:
            return "ttl_expired"
        if record.lease_expires_at is not None and record.lease_expires_at <= now:
            return "lease_expired"
        return None

    @staticmethod
    def adoptable(record: _Deadlines, now: float) -> bool:
        """Whether a restarted Worker may take back this sandbox (its TTL is not over; the
        lease starts afresh on adoption).
        """
        return record.expires_at is None or record.expires_at > now

    @staticmethod
    def renew_interval(lease_seconds: float | None) -> float | None:
        """Seconds between a client's renewals of this lease (see :func:`renew_interval`)."""
        return renew_interval(lease_seconds)


@dataclass(frozen=True, slots=True)
class IdleLifetime:
    """Objects that end when unused for ``idle_ttl_seconds`` (the GEM env instances)."""

    idle_ttl_seconds: float
    reap_interval_seconds: float
    #: Extra seconds of the backing sandbox's lease over the idle TTL, so the lease outlives
    #: a reap cycle and the reaper (not the lease) ends an idle instance.
    lease_margin_seconds: float

    #: Shortest pause of the idle reaper.
    MIN_REAP_PAUSE = 0.05

    def lease_seconds(self) -> float:
        """The lease of the sandbox behind an instance."""
        return self.idle_ttl_seconds + self.lease_margin_seconds

    def idle(self, last_used: float, now: float) -> bool:
        """Whether an instance last used at ``last_used`` is idle at ``now``."""
        return last_used <= now - self.idle_ttl_seconds

    def reap_pause(self) -> float:
        """Seconds between two passes of the idle reaper: the reap interval, or a quarter of
        the idle TTL when that is shorter (a short TTL is honoured to within a quarter).
        """
        return min(self.reap_interval_seconds, max(self.idle_ttl_seconds / 4, self.MIN_REAP_PAUSE))
