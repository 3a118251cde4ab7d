"""Prometheus metrics of one edge server (``prometheus_client``, a private registry).

Exposed at ``GET /metrics`` in the Prometheus text format:

- ``edgeslim_requests_total{endpoint, model, code}``: requests answered, by HTTP status
  (those refused for a missing or wrong bearer token under the endpoint ``auth``);
- ``edgeslim_request_errors_total{endpoint, model, code}``: those answered with a 4xx/5xx;
- ``edgeslim_request_latency_seconds{endpoint, model}``: handling time, histogram;
- ``edgeslim_batch_size{model}``: requests' rows per model run, histogram;
- ``edgeslim_model_info{model, version, sha256}``: 1 for the model version being served;
- ``edgeslim_model_loads_total{model, result}``: loads and swaps, ``ok`` or ``failed``;
- ``edgeslim_inflight_requests``: requests being handled now.
"""

from __future__ import annotations

from typing import Any

from edgeslim.errors import require

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The metric families of one server; ``render()`` gives the exposition text."""

    def __init__(self) -> None:
        require("prometheus_client", "edge", "The edge server's /metrics endpoint")
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgeslim_requests", "Requests answered, by HTTP status.",
                                ["endpoint", "model", "code"], registry=r)
        self.errors = Counter("edgeslim_request_errors", "Requests answered with an error.",
                              ["endpoint", "model", "code"], registry=r)
        self.latency = Histogram("edgeslim_request_latency_seconds",
                                 "Time to handle a request, in seconds.", ["endpoint", "model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("edgeslim_batch_size", "Rows per model run.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.model_info = Gauge("edgeslim_model_info", "1 for each model version served.",
                                ["model", "version", "sha256"], registry=r)
        self.loads = Counter("edgeslim_model_loads", "Model loads and swaps.",
                             ["model", "result"], registry=r)
        self.inflight = Gauge("edgeslim_inflight_requests", "Requests being handled.",
                              registry=r)
        self.inflight.set_function(lambda: self._inflight)
        self._inflight = 0
        self._served: dict[str, tuple[str, str, str]] = {}
        # Label children by (endpoint, model, code): looking them up costs more than counting.
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def enter(self) -> None:
        """A request started (``edgeslim_inflight_requests``; call from the event loop)."""
        self._inflight += 1

    def leave(self) -> None:
        """A request finished."""
        self._inflight -= 1

    def observe(self, endpoint: str, model: str, code: int, seconds: float) -> None:
        """Count one answered request."""
        key = (endpoint, model, code)
        children = self._children.get(key)
        if children is None:
            c = str(code)
            children = (self.requests.labels(endpoint, model, c),
                        self.errors.labels(endpoint, model, c) if code >= 400 else None,
                        self.latency.labels(endpoint, model))
            self._children[key] = children
        requests, errors, latency = children
        requests.inc()
        if errors is not None:
            errors.inc()
        latency.observe(seconds)

    def set_model(self, name: str, version: str, sha256: str) -> None:
        """Mark ``name`` as serving ``version`` (drops the label set of the previous one)."""
        old = self._served.pop(name, None)
        if old is not None:
            self.model_info.remove(*old)
        labels = (name, version, sha256)
        self.model_info.labels(*labels).set(1)
        self._served[name] = labels

    def drop_model(self, name: str) -> None:
        old = self._served.pop(name, None)
        if old is not None:
            self.model_info.remove(*old)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
