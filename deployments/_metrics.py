"""Platform metrics on Ray's metrics system (exported on each node's Prometheus endpoint).

Names (Ray prefixes them with ``ray_``): ``rock_sandboxes{worker,runtime,state}`` and
``rock_namespace_sandboxes{worker,runtime,namespace}`` gauges,
``rock_create_seconds{worker,runtime,namespace,outcome}`` and
``rock_op_seconds{worker,runtime,namespace,op}`` histograms,
``rock_errors_total{component,op,code}`` counter,
``rock_reaped_total{worker,runtime,reason}`` counter,
``rock_processes_running{worker,runtime}`` gauge (the Worker's process table),
``rock_rejected_total{component,namespace,code}`` (401/403/429) and
``rock_audit_errors_total{component,sink}`` counters; set by the watcher
(``deployments/_notify.py``): ``rock_workers{state}``, ``rock_admission{kind}`` and
``rock_overdue_sandboxes{kind}`` gauges (alerts in ``configs/alerts.yaml``). ``worker`` is
the node label (one Worker per node, named after it; Ray adds ``NodeAddress`` too).

Cardinality is bounded: ``state``, ``outcome``, ``op``, ``code`` and ``reason`` come from
fixed sets in our code; ``namespace`` keeps the first :data:`MAX_NAMESPACES` namespaces a
process sees and reports the rest as ``other``.
Outside a Ray process every call is a no-op, so the Worker and Scheduler stay testable without
Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MAX_NAMESPACES", "Metrics", "metrics"]

#: Distinct ``namespace`` label values one process exports; later ones become ``other``.
MAX_NAMESPACES = 50

_LATENCY_BOUNDARIES = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
_STATES = ("pending", "starting", "running", "stopping", "stopped", "removed", "failed")


class Metrics:
    """Records what the platform does; a no-op unless built inside a Ray process."""

    def __init__(self, component: str, worker: str = "", runtime: str = "") -> None:
        self.component = component
        self.worker = worker
        self.runtime = runtime
        self._namespaces: set[str] = set()
        self._ns_counts: dict[str, int] = {}
        #: Sandboxes reaped by reason since this recorder was made (the console's chart).
        self.reaped_counts: dict[str, int] = {}
        self._m: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics as rm
        except ImportError:  # pragma: no cover - the server extra is not installed
            return
        if not ray.is_initialized():
            return
        self._m = {
            "sandboxes": rm.Gauge(
                "rock_sandboxes",
                description="Sandboxes owned by a Worker, by state.",
                tag_keys=("worker", "runtime", "state"),
            ),
            "ns_sandboxes": rm.Gauge(
                "rock_namespace_sandboxes",
                description="Live sandboxes owned by a Worker, by namespace.",
                tag_keys=("worker", "runtime", "namespace"),
            ),
            "create": rm.Histogram(
                "rock_create_seconds",
                description="Sandbox create + start latency.",
                boundaries=_LATENCY_BOUNDARIES,
                tag_keys=("worker", "runtime", "namespace", "outcome"),
            ),
            "op": rm.Histogram(
                "rock_op_seconds",
                description="Data-plane call latency at the Worker (exec, session run, ...).",
                boundaries=_LATENCY_BOUNDARIES,
                tag_keys=("worker", "runtime", "namespace", "op"),
            ),
            "errors": rm.Counter(
                "rock_errors_total",
                description="Errors returned, by component, operation and error code.",
                tag_keys=("component", "op", "code"),
            ),
            "reaped": rm.Counter(
                "rock_reaped_total",
                description="Sandboxes removed by the reaper, by reason.",
                tag_keys=("worker", "runtime", "reason"),
            ),
            "rejected": rm.Counter(
                "rock_rejected_total",
                description="Calls refused with 401, 403 or 429, by caller namespace and code.",
                tag_keys=("component", "namespace", "code"),
            ),
            "workers": rm.Gauge(
                "rock_workers",
                description="Workers the Scheduler knows, alive or not (sampled by the Admin).",
                tag_keys=("component", "state"),
            ),
            "admission": rm.Gauge(
                "rock_admission",
                description="Creates queued and in flight at the Scheduler (sampled by the Admin).",
                tag_keys=("component", "kind"),
            ),
            "overdue": rm.Gauge(
                "rock_overdue_sandboxes",
                description="Sandboxes still listed past their TTL or lease by more than two "
                "reap intervals (reaper lag; sampled by the Admin).",
                tag_keys=("component", "kind"),
            ),
            "processes": rm.Gauge(
                "rock_processes_running",
                description="Background processes running in a Worker's sandboxes.",
                tag_keys=("worker", "runtime"),
            ),
            "audit_errors": rm.Counter(
                "rock_audit_errors_total",
                description="Audit events a sink failed to write (or dropped), by sink.",
                tag_keys=("component", "sink"),
            ),
        }

    @property
    def enabled(self) -> bool:
        """True when the metrics are exported (inside Ray)."""
        return bool(self._m)

    def processes(self, running: int) -> None:
        """Set the processes-running gauge."""
        if self._m:
            self._m["processes"].set(running, tags=self._tags())

    def namespace(self, namespace: str) -> str:
        """``namespace`` as a label value: itself, or ``other`` past :data:`MAX_NAMESPACES`."""
        if not namespace:
            return "-"
        if namespace in self._namespaces:
            return namespace
        if len(self._namespaces) < MAX_NAMESPACES:
            self._namespaces.add(namespace)
            return namespace
        return "other"

    def _tags(self, **more: str) -> dict[str, str]:
        return {"worker": self.worker, "runtime": self.runtime, **more}

    def sandboxes(
        self, by_state: Mapping[str, int], by_namespace: Mapping[str, int] | None = None
    ) -> None:
        """Set the sandbox gauges; states (and namespaces seen before) not given are set to 0."""
        if not self._m:
            return
        for state in _STATES:
            self._m["sandboxes"].set(by_state.get(state, 0), tags=self._tags(state=state))
        if by_namespace is None:
            return
        counts: dict[str, int] = {}
        for namespace, n in by_namespace.items():
            label = self.namespace(namespace)
            counts[label] = counts.get(label, 0) + n
        for label in set(self._ns_counts) | set(counts):
            self._m["ns_sandboxes"].set(counts.get(label, 0), tags=self._tags(namespace=label))
        self._ns_counts = counts

    def created(self, seconds: float, ok: bool, namespace: str = "") -> None:
        """One create finished (or failed) after ``seconds``."""
        if self._m:
            tags = self._tags(namespace=self.namespace(namespace), outcome="ok" if ok else "error")
            self._m["create"].observe(seconds, tags=tags)

    def op(self, op: str, seconds: float, namespace: str = "") -> None:
        """One data-plane call took ``seconds``."""
        if self._m:
            tags = self._tags(namespace=self.namespace(namespace), op=op)
            self._m["op"].observe(seconds, tags=tags)

    def error(self, op: str, code: str) -> None:
        """One error with ``code`` was returned by ``op``."""
        if self._m:
            self._m["errors"].inc(tags={"component": self.component, "op": op, "code": code})

    def reaped(self, reason: str, n: int = 1) -> None:
        """``n`` sandboxes were reaped for ``reason`` (e.g. ``ttl``)."""
        if n:
            self.reaped_counts[reason] = self.reaped_counts.get(reason, 0) + n
        if self._m and n:
            self._m["reaped"].inc(n, tags=self._tags(reason=reason))

    def rejected(self, namespace: str, code: str) -> None:
        """One call by ``namespace`` was refused with ``code`` (unauthorized, rate_limited...)."""
        if self._m:
            tags = {
                "component": self.component,
                "namespace": self.namespace(namespace),
                "code": code,
            }
            self._m["rejected"].inc(tags=tags)

    def cluster(
        self, alive: int, dead: int, queued: int, in_flight: int, overdue: Mapping[str, int]
    ) -> None:
        """Cluster-wide gauges the Admin samples: Workers, admission, overdue sandboxes."""
        if not self._m:
            return
        base = {"component": self.component}
        self._m["workers"].set(alive, tags={**base, "state": "alive"})
        self._m["workers"].set(dead, tags={**base, "state": "dead"})
        self._m["admission"].set(queued, tags={**base, "kind": "queued"})
        self._m["admission"].set(in_flight, tags={**base, "kind": "in_flight"})
        for kind in ("ttl", "lease"):
            self._m["overdue"].set(overdue.get(kind, 0), tags={**base, "kind": kind})

    def audit_error(self, sink: str, n: int = 1) -> None:
        """``n`` audit events were not written by ``sink`` (``file``, ``redis``, ``queue``)."""
        if self._m and n:
            self._m["audit_errors"].inc(n, tags={"component": self.component, "sink": sink})


def metrics(component: str, worker: str = "", runtime: str = "") -> Metrics:
    """The metrics recorder of one component (``worker`` or ``admin``)."""
    return Metrics(component, worker, runtime)
