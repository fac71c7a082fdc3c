"""The TTL and lease rules (``rock_serve.lifetime``) with a fake clock: no Ray, no sleeping.

The same object answers the Scheduler (limits, liveness), the Worker (deadlines, reap reason,
adoption), the SDK heartbeat (renew interval) and the GEM env table (idle TTL, lease margin).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from rock_serve.config import GemConfig, ServerArgs, parse_server_args
from rock_serve.deployments._gem import EnvTable, _Instance
from rock_serve.errors import InvalidConfig, InvalidRequest
from rock_serve.lifetime import MIN_RENEW_INTERVAL, IdleLifetime, Lifetime, renew_interval
from rock_serve.sdk._heartbeat import interval_for


@dataclass
class Record:
    expires_at: float | None
    lease_expires_at: float | None = None


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


RULES = Lifetime(
    default_ttl_seconds=3600, max_ttl_seconds=7200, default_lease_seconds=600, max_lease_seconds=900
)


def test_a_create_gets_the_default_ttl_and_lease_and_limits_are_typed_errors():
    assert RULES.admit(None, None) == 3600
    assert RULES.admit(60, 30) == 60
    assert RULES.lease(None) == 600 and RULES.lease(5) == 5
    with pytest.raises(InvalidRequest, match="ttl_seconds 7201"):
        RULES.admit(7201, None)
    with pytest.raises(InvalidRequest, match="lease_seconds 901"):
        RULES.admit(None, 901)
    no_lease = Lifetime(60, 60, None, 60)
    assert no_lease.lease(None) is None
    assert Lifetime.fork_lease(None, 30) == 30 and Lifetime.fork_lease(10, 30) == 10
    assert Lifetime.fork_lease(None, None) is None


def test_rules_come_from_server_args():
    args = ServerArgs.model_validate(
        {"default_ttl_seconds": 10, "max_ttl_seconds": 20, "default_lease_seconds": None}
    )
    assert Lifetime.of(args) == Lifetime(10, 20, None, args.max_lease_seconds)


def test_a_lease_renewed_by_calls_runs_out_one_lease_after_the_last_call():
    clock = Clock()
    record = Record(expires_at=Lifetime.expires_at(clock(), 100))
    record.lease_expires_at = Lifetime.lease_deadline(10, clock())
    for _ in range(5):  # a call every 9 s keeps it
        clock.now += 9
        assert Lifetime.reap_reason(record, clock()) is None
        record.lease_expires_at = Lifetime.lease_deadline(10, clock())
    clock.now += 9.999
    assert Lifetime.reap_reason(record, clock()) is None
    clock.now += 0.001
    assert Lifetime.reap_reason(record, clock()) == "lease_expired"
    assert Lifetime.live(record, clock())  # the registry still lists it until it is reaped


def test_the_ttl_is_a_hard_deadline_whatever_the_lease():
    clock = Clock()
    record = Record(expires_at=clock() + 30, lease_expires_at=clock() + 600)
    clock.now += 29.5
    assert Lifetime.reap_reason(record, clock()) is None and Lifetime.live(record, clock())
    clock.now += 0.5
    record.lease_expires_at = clock() - 1  # both over: the TTL is the reason
    assert Lifetime.reap_reason(record, clock()) == "ttl_expired"
    assert not Lifetime.live(record, clock()) and not Lifetime.adoptable(record, clock())
    assert Lifetime.lease_deadline(None, clock()) is None
    assert Lifetime.live(Record(expires_at=None), clock())


def test_the_sdk_renews_three_times_per_lease_but_not_too_often():
    assert renew_interval(None) is None
    assert renew_interval(30) == 10
    assert renew_interval(0.3) == MIN_RENEW_INTERVAL
    for lease in (None, 0.1, 0.6, 30.0, 600.0):
        assert interval_for(lease) == RULES.renew_interval(lease) == renew_interval(lease)


def test_idle_rule_of_env_instances():
    rule = IdleLifetime(idle_ttl_seconds=600, reap_interval_seconds=10, lease_margin_seconds=60)
    assert rule.lease_seconds() == 660
    assert not rule.idle(last_used=1000, now=1599.9) and rule.idle(last_used=1000, now=1600)
    assert rule.reap_pause() == 10
    assert IdleLifetime(1, 10, 0).reap_pause() == 0.25  # a quarter of a short idle TTL
    assert IdleLifetime(0.01, 10, 0).reap_pause() == IdleLifetime.MIN_REAP_PAUSE


def test_gem_limits_and_idle_ttl_are_server_args():
    args = parse_server_args({"gem": {"idle_ttl_seconds": 5, "max_instances_per_namespace": 3}})
    assert args.gem.idle_ttl_seconds == 5 and args.gem.max_instances_per_namespace == 3
    assert ServerArgs().gem == GemConfig()
    with pytest.raises(InvalidConfig, match="gem.idle_ttl_seconds"):
        parse_server_args({"gem": {"idle_ttl_seconds": 0}})
    with pytest.raises(InvalidConfig, match="gem.nope"):
        parse_server_args({"gem": {"nope": 1}})


class _Env:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


async def test_the_env_table_reaps_idle_instances_by_its_config():
    clock = Clock()
    table = EnvTable("rock-unit", {"idle_ttl_seconds": 60, "lease_margin_seconds": 5}, clock=clock)
    assert table.lifetime == IdleLifetime(60, GemConfig().reap_interval_seconds, 5)
    assert table._lease() == 65  # the lease of each instance's sandbox
    envs: dict[str, Any] = {}
    for name, used in (("old", 1000.0), ("new", 1030.0)):
        envs[name] = _Env()
        table._instances[name] = _Instance(name, "default", "rock/X-v0", envs[name], used)
    clock.now = 1059.0
    assert await table.reap() == []
    clock.now = 1060.0
    assert await table.reap() == ["old"] and envs["old"].closed and not envs["new"].closed
    busy = table._instances["new"]
    async with busy.lock:  # an instance in use is never reaped
        clock.now = 2000.0
        assert await table.reap() == []
    await table.configure({"idle_ttl_seconds": 5000}, reap_interval_seconds=1)
    try:
        assert table.config.idle_ttl_seconds == 5000 and table.config.reap_interval_seconds == 1
        assert table.lifetime.lease_seconds() == 5060  # a config given is whole: margin 60
        assert await table.reap() == []
    finally:
        reaper = table._reaper
        assert reaper is not None
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
