"""Staged rollouts: canary first, a soak that watches the canaries, then the rest; rollback.

A deployment moves through ``pending -> canary -> soak -> rolling -> succeeded``; any failure
takes it to ``rolling_back -> rolled_back``. Each target (a node) moves through ``pending ->
sent -> installed | failed``, and on rollback ``rolled_back -> reverted`` (``reverted`` once
the node reports it serves its previous bundle again); targets a rolled-back deployment never
sent anything to end ``skipped``. The controller's only lever is the
retained desired state of each node; the node's only answer is a report record in its outbox.

Rollback triggers:
- a canary refuses the bundle (signature, sha256, corrupt archive) or fails its probe;
- a canary does not report within ``install_timeout_s``;
- during the soak, the canaries' error rate or p99 latency regresses past the thresholds
  (``judge``), compared with the nodes still on the old bundle over the same window (or,
  when none of them reported then, with the canaries' own windows before the deployment);
- a node of the second phase fails (``max_failures`` allows a fraction);
- an operator asks (``edgeslim fleet rollback``).

When the controller stops, a rollout stops too, at its next wait, and writes nothing more: the
deployment stays as it stood (``canary``, ``soak``, ``rolling``, ``rolling_back``) and the
controller's next start rolls it back (``Controller.start``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from edgeslim._validate import check_fraction, check_int_range, check_positive

if TYPE_CHECKING:
    from edgeslim.fleet.controller import Controller

__all__ = ["RolloutParams", "WindowStats", "judge", "pick_canaries", "window_stats"]

log = logging.getLogger("edgeslim.fleet.rollout")

FINAL_STATES = ("succeeded", "rolled_back", "failed")


@dataclass
class RolloutParams:
    """Knobs of one rollout (seconds, fractions, milliseconds)."""

    canary: float = 0.1  # fraction of targets installed first; 0 = no canary phase
    soak_s: float = 10.0  # how long canaries serve before the rest is touched
    install_timeout_s: float = 120.0  # per node: desired sent -> report received
    max_error_rate: float = 0.01  # allowed rise of the canaries' error rate over the baseline
    max_p99_ratio: float = 3.0  # canary p99 may be at most ratio * baseline p99 ...
    p99_slack_ms: float = 20.0  # ... or baseline + slack, whichever is larger
    min_requests: int = 20  # fewer requests in the soak window: latency/error not judged
    max_failures: float = 0.0  # fraction of second-phase nodes allowed to fail
    parallel: int = 100  # nodes installing at once
    force: bool = False  # deploy a bundle the controller could not verify (nodes still do)
    allow_downgrade: bool = False  # deploy a version lower than a target serves (a rollback)
    allow_model_change: bool = False  # deploy another model than a target serves (by name)

    def validate(self) -> RolloutParams:
        f = "deploy"
        check_fraction(self.canary, "canary", f, closed_right=True)
        check_positive(self.soak_s, "soak_s", f, allow_zero=True)
        check_positive(self.install_timeout_s, "install_timeout_s", f)
        check_fraction(self.max_error_rate, "max_error_rate", f, closed_right=True)
        check_positive(self.max_p99_ratio, "max_p99_ratio", f)
        check_positive(self.p99_slack_ms, "p99_slack_ms", f, allow_zero=True)
        check_int_range(self.min_requests, "min_requests", f, 0, 10**9)
        check_fraction(self.max_failures, "max_failures", f, closed_right=True)
        check_int_range(self.parallel, "parallel", f, 1, 10**6)
        for name in ("force", "allow_downgrade", "allow_model_change"):
            if not isinstance(getattr(self, name), bool):
                from edgeslim.errors import ConfigError

                raise ConfigError(f"The '{name}' parameter of {f} must be true or false. Got "
                                  f"{getattr(self, name)!r} instead.")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutParams:
        from edgeslim.errors import ConfigError

        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown rollout parameters {unknown}; allowed: {sorted(known)}")
        return cls(**data).validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pick_canaries(nodes: list[str], fraction: float, salt: str) -> list[str]:
    """``ceil(fraction * n)`` nodes (at least one when fraction > 0), spread by a stable hash.

    The choice depends only on the node ids and ``salt`` (the bundle sha), so a retried
    deployment picks the same canaries.
    """
    if fraction <= 0 or not nodes:
        return []
    k = min(len(nodes), max(1, math.ceil(fraction * len(nodes) - 1e-9)))
    ranked = sorted(nodes, key=lambda n: hashlib.sha256(f"{salt}:{n}".encode()).hexdigest())
    return sorted(ranked[:k])


@dataclass(frozen=True)
class WindowStats:
    """Traffic seen over a window: request and error counts, p99 latency (ms)."""

    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


def window_stats(bodies: list[dict[str, Any]]) -> WindowStats:
    """Aggregate telemetry bodies: counts summed, p99 the request-weighted mean of windows."""
    req = sum(int(b.get("requests", 0)) for b in bodies)
    err = sum(int(b.get("errors", 0)) for b in bodies)
    weighted = sum(float(b.get("p99_ms", 0.0)) * int(b.get("requests", 0)) for b in bodies)
    return WindowStats(requests=req, errors=err, p99_ms=weighted / req if req else 0.0)


def judge(canary: WindowStats, baseline: WindowStats | None, p: RolloutParams) -> str | None:
    """None when the canaries are fine; else the reason to roll back (one sentence)."""
    if canary.requests < p.min_requests:
        return None  # too little traffic to judge; the probe already passed on every canary
    base_err = baseline.error_rate if baseline and baseline.requests >= p.min_requests else 0.0
    if canary.error_rate > base_err + p.max_error_rate:
        return (
            f"canary error rate {canary.error_rate:.3%} over {canary.requests} requests exceeds "
            f"the baseline {base_err:.3%} + {p.max_error_rate:.3%}"
        )
    if baseline is not None and baseline.requests >= p.min_requests and baseline.p99_ms > 0:
        limit = max(baseline.p99_ms * p.max_p99_ratio, baseline.p99_ms + p.p99_slack_ms)
        if canary.p99_ms > limit:
            return (
                f"canary p99 latency {canary.p99_ms:.2f} ms exceeds {limit:.2f} ms "
                f"(baseline {baseline.p99_ms:.2f} ms x {p.max_p99_ratio:g} or + "
                f"{p.p99_slack_ms:g} ms)"
            )
    return None


class Aborted(Exception):
    """An operator asked for a rollback while the rollout ran."""


class Stopped(Exception):
    """The controller is stopping: leave the deployment as it stands, write nothing more."""


class Rollout(threading.Thread):
    """Drives one deployment to a final state; runs on its own thread inside the controller."""

    def __init__(
        self,
        controller: Controller,
        dep_id: int,
        params: RolloutParams,
        *,
        rollback_reason: str | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"rollout-{dep_id}", daemon=True)
        self.c = controller
        self.dep_id = dep_id
        self.p = params
        # the controller's stop event: every wait below ends on it, and the thread with it
        self._halt = stop if stop is not None else threading.Event()
        self._abort = threading.Event()
        self._abort_reason = ""
        self._rollback_only = rollback_reason
        self.succeeded = False  # set with the final state, under the controller's rollout_lock

    def abort(self, reason: str) -> None:
        self._abort_reason = reason
        self._abort.set()
        self.c.notify()

    # ------------------------------------------------------------------ helpers
    def _state(self, state: str, reason: str = "") -> None:
        self._check_stop()
        log.info("deployment %d: %s %s", self.dep_id, state, reason)
        self.c.registry.set_deployment_state(self.dep_id, state, reason)

    def _targets(self) -> dict[str, Any]:
        dep = self.c.registry.deployment(self.dep_id)
        return {t.node: t for t in dep.targets} if dep else {}

    def _check_stop(self) -> None:
        if self._halt.is_set():
            raise Stopped()

    def _check_abort(self) -> None:
        self._check_stop()
        if self._abort.is_set():
            raise Aborted(self._abort_reason)

    def _wait(self, timeout: float) -> None:
        """Wait for a registry change (at most ``timeout`` s); ``Stopped`` once the controller
        stops (it wakes every waiter), so that no write follows its stop."""
        self.c.wait_change(timeout)
        self._check_stop()

    # ------------------------------------------------------------------ phases
    def run(self) -> None:
        try:
            self._drive()
        except Stopped:
            # Not rolled back here: the broker link and the registry are going away, so a
            # rollback could not be published, nor its confirmations heard. The next start
            # rolls back whatever is not final.
            log.info("deployment %d: left unfinished, the controller stopped", self.dep_id)
        finally:
            self.c.rollout_finished(self.dep_id)

    def _drive(self) -> None:
        try:
            if self._rollback_only is not None:
                self._safe_rollback(self._rollback_only)
            else:
                self._run()
        except Stopped:
            raise
        except Aborted as exc:
            self._safe_rollback(str(exc) or "rollback requested")
        except Exception as exc:  # a controller bug must not leave a deployment half-done
            log.exception("deployment %d crashed", self.dep_id)
            self._safe_rollback(f"controller error: {exc}")

    def _safe_rollback(self, reason: str) -> None:
        """``_rollback``, and a final state even when it fails (``failed``: not every node
        may have been sent back; a new deployment or a restart sets their desired states)."""
        try:
            self._rollback(reason)
        except Stopped:
            raise
        except Exception as exc:
            log.exception("deployment %d: rollback failed", self.dep_id)
            self._state("failed", f"rollback did not complete ({exc}) after: {reason}")

    def _run(self) -> None:
        dep = self.c.registry.deployment(self.dep_id)
        if dep is None:
            return
        canary = [t.node for t in dep.targets if t.phase == "canary"]
        rest = [t.node for t in dep.targets if t.phase == "rest"]
        if canary:
            self._state("canary", f"{len(canary)} canary node(s)")
            failed = self._install(canary)
            if failed:
                node, why = failed[0]
                raise Aborted(f"canary {node} failed: {why}")
            if self.p.soak_s > 0:
                self._state("soak", f"watching canaries for {self.p.soak_s:g} s")
                reason = self._soak(canary, rest)
                if reason:
                    raise Aborted(reason)
        if rest:
            self._state("rolling", f"{len(rest)} node(s)")
            failed = self._install(rest)
            if len(failed) > self.p.max_failures * len(rest):
                node, why = failed[0]
                raise Aborted(f"{len(failed)} of {len(rest)} node(s) failed, e.g. {node}: {why}")
            if failed:
                self._succeed(f"{len(failed)} node(s) failed, within max_failures")
                return
        self._succeed()

    def _succeed(self, reason: str = "") -> None:
        """The final state, unless a rollback was asked for meanwhile: an operator's rollback
        that arrives with the last report is not lost (``Controller.rollback`` aborts a live
        rollout only while it has not succeeded, under the same lock)."""
        with self.c.rollout_lock:
            self._check_abort()
            self._state("succeeded", reason)
            self.succeeded = True

    def _install(self, nodes: list[str]) -> list[tuple[str, str]]:
        """Send desired states, ``parallel`` at a time; wait for reports; return failures."""
        dep = self.c.registry.deployment(self.dep_id)
        bundle = self.c.registry.bundle(dep.bundle_sha) if dep else None
        if bundle is None:
            raise RuntimeError(f"deployment {self.dep_id} lost its bundle record")
        waiting: dict[str, float] = {}
        queue = list(nodes)
        failed: list[tuple[str, str]] = []
        while queue or waiting:
            self._check_abort()
            while queue and len(waiting) < self.p.parallel:
                batch = queue[: self.p.parallel - len(waiting)]
                del queue[: len(batch)]
                # Mark first, publish second: a fast node's report must find "sent", not be
                # overwritten by it.
                with self.c.desired_lock:
                    self._check_stop()  # (a stopping controller's link may be down already)
                    self.c.registry.set_targets(self.dep_id, batch, "sent",
                                                only_from=("pending",))
                    for node in batch:
                        self.c.publish_desired(node, self.dep_id, bundle["sha256"], bundle,
                                               False)
                        waiting[node] = time.monotonic()
            self._wait(0.5)
            targets = self._targets()
            now = time.monotonic()
            for node in list(waiting):
                t = targets[node]
                if t.state == "installed":
                    del waiting[node]
                elif t.state == "failed":
                    del waiting[node]
                    failed.append((node, t.detail))
                elif now - waiting[node] > self.p.install_timeout_s:
                    del waiting[node]
                    why = f"no report within {self.p.install_timeout_s:g} s"
                    self.c.registry.set_targets(
                        self.dep_id, [node], "failed", why, only_from=("sent",)
                    )
                    failed.append((node, why))
            if failed and not self.p.max_failures:
                return failed
        return failed

    def _soak(self, canary: list[str], rest: list[str]) -> str | None:
        """Watch the canaries for ``soak_s``; the reason to roll back, or None.

        Only telemetry windows that began after the soak began count (a window that covers
        the install itself would blame the new bundle for the load of installing it), timed on
        the controller's clock: arrival less the window's length. The
        baseline is the nodes still on the old bundle over the same time, or, when every
        target is a canary, the canaries' own windows before the deployment.
        """
        start = time.time()
        deadline = time.monotonic() + self.p.soak_s
        while time.monotonic() < deadline:
            self._check_abort()
            self._wait(min(0.5, max(0.0, deadline - time.monotonic())))
        self._check_stop()  # (a soak of 0 s waits for nothing)
        dep = self.c.registry.deployment(self.dep_id)
        if dep is None:
            raise RuntimeError(f"deployment {self.dep_id} disappeared")
        sha = dep.bundle_sha

        def began(r: dict[str, Any]) -> float:
            # On the controller's clock (when the window arrived, less its length): a node's
            # own clock may be off by minutes, which would drop or admit every one of its
            # windows.
            return float(r["received"]) - float(r["body"].get("window_s", 0.0))

        records = [r for r in self.c.registry.records(kind="telemetry", since=start)
                   if began(r) >= start - 0.05]  # fmt: skip
        can = [r["body"] for r in records if r["node"] in canary and r["body"].get("bundle") == sha]
        rest_set = set(rest)
        base = [r["body"] for r in records if r["node"] in rest_set]
        if not base:
            before = self.c.registry.records(kind="telemetry", since=dep.created - 60.0)
            base = [
                r["body"]
                for r in before
                if r["node"] in canary and r["body"].get("bundle") != sha
                and r["received"] <= dep.created
            ]
        canary_stats = window_stats(can)
        base_stats = window_stats(base) if base else None
        log.info("deployment %d soak: canary %s baseline %s", self.dep_id, canary_stats, base_stats)
        return judge(canary_stats, base_stats, self.p)

    def _rollback(self, reason: str) -> None:
        """Point every touched target back at its previous bundle; wait for confirmations."""
        self._state("rolling_back", reason)
        with self.c.desired_lock:  # a republish sees the targets before or after, not between
            self._check_stop()
            targets = self._targets().values()
            touched = [t for t in targets if t.state not in ("pending", "reverted")]
            self.c.registry.set_targets(self.dep_id, [t.node for t in touched], "rolled_back",
                                        reason)
            # the targets it never reached end too: "skipped" (never sent the bundle)
            self.c.registry.set_targets(self.dep_id,
                                        [t.node for t in targets if t.state == "pending"],
                                        "skipped", f"never sent: {reason}",
                                        only_from=("pending",))
            for t in touched:  # after marking, so a fast confirmation lands on "rolled_back"
                self.c.revert_node(t.node, self.dep_id, t.previous_sha)
        deadline = time.monotonic() + min(self.p.install_timeout_s, 60.0)
        names = {t.node for t in touched if t.previous_sha}
        while names and time.monotonic() < deadline:
            targets = self._targets()
            if all(targets[n].state == "reverted" for n in names):
                break
            self._wait(0.5)
        self._state("rolled_back", reason)
