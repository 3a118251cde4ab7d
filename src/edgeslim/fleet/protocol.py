"""Topics and message schemas of the fleet protocol (MQTT 5, JSON payloads, UTF-8).

Every topic lives under ``edgeslim/``. ``NODE`` is a node id, ``MODEL_SHA`` the sha256 of a
bundle's model.onnx.

| topic                              | from -> to            | QoS | retained | payload        |
|------------------------------------|-----------------------|-----|----------|----------------|
| ``edgeslim/nodes/NODE/status``     | node -> all           | 1   | yes      | ``Status``     |
| ``edgeslim/nodes/NODE/telemetry``  | node -> controller    | 1   | no       | ``Batch``      |
| ``edgeslim/nodes/NODE/ack``        | controller -> node    | 1   | no       | ``Ack``        |
| ``edgeslim/nodes/NODE/desired``    | controller -> node    | 1   | yes      | ``Desired``    |
| ``edgeslim/results/MODEL_SHA/NODE`` | node -> ctrl, any    | 0   | no       | ``Result``     |
| ``edgeslim/controller/status``     | controller -> nodes   | 1   | yes      | ``{"state"}``  |

- ``status`` is the node's heartbeat and its registration: id, labels, model served, health,
  HTTP address. It is retained, so a controller or peer that subscribes later learns every
  node at once; the node's last will publishes the same topic with ``state: "offline"``.
- ``telemetry`` carries batches of records from the node's SQLite outbox (stats, deployment
  reports, inference results); the controller stores them, commits, then answers ``ack`` with
  the ids it saved. The node deletes only acknowledged records, so nothing is lost (a record
  larger than any message the broker takes stays on the node, in the outbox's ``set_aside``
  table) and the controller deduplicates by record id.
- ``desired`` is the state the controller wants (which bundle to serve). Retained, so a node
  that was offline converges when it comes back; a rollback is a new desired state.
- ``controller/status`` is ``{"state": "online"}`` while the controller is connected (its last
  will says ``"offline"``); a node that sees it come online resends its unacknowledged
  records at once instead of waiting for the ack timeout.
- ``results/MODEL_SHA/NODE`` lets the controller (and any client the ACL allows) follow
  inference results (outputs only; the raw inputs never leave the device): subscribe to
  ``edgeslim/results/MODEL_SHA/#`` for one model's, ``edgeslim/results/#`` for all. The topic
  names the sender, so the broker's ACL (``pattern write edgeslim/results/+/%c``) lets a node
  publish only its own results, and the controller keeps only results whose ``node`` is the
  topic's.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from edgeslim.errors import ConfigError

__all__ = [
    "CONTROLLER_TOPIC",
    "PREFIX",
    "PROTOCOL_VERSION",
    "RECORD_KINDS",
    "Ack",
    "Batch",
    "BrokerURL",
    "Desired",
    "ModelRef",
    "ProtocolError",
    "Record",
    "Result",
    "Status",
    "check_node_id",
    "check_sha256",
    "decode",
    "encode",
    "node_from_topic",
    "parse_labels",
    "result_from_topic",
    "topic",
]

PREFIX = "edgeslim"
PROTOCOL_VERSION = 1
RECORD_KINDS = ("telemetry", "report", "result", "event")

# Used with fullmatch only: "$" also matches before a trailing newline, so "^...$" with
# match() lets "edge-1\n" through.
_NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LABEL_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A peer's V2 base URL: scheme, host (a name, IPv4 or [IPv6]) and port, nothing else. A path,
# query, fragment or userinfo would let a status message choose where offloaded requests
# land beyond the host it names (".../steal?x=" swallows the V2 path into a query).
_HTTP_BASE = re.compile(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?/?")


class ProtocolError(ConfigError):
    """A message on a fleet topic does not follow the schema (it is logged and dropped)."""


def check_node_id(value: Any, func: str = "fleet") -> str:
    """A node id: 1-64 characters from [A-Za-z0-9_.-] (no MQTT wildcards, no '/')."""
    if not isinstance(value, str) or not _NODE_ID.fullmatch(value):
        raise ConfigError(
            f"The 'id' parameter of {func} must be 1-64 characters from [A-Za-z0-9_.-]. "
            f"Got {value!r} instead."
        )
    return value


def check_sha256(value: Any, name: str = "sha256", func: str = "fleet") -> str:
    """A lower-case hex sha256 (64 characters)."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise ConfigError(
            f"The '{name}' parameter of {func} must be a lower-case hex sha256 "
            f"(64 characters). Got {value!r} instead."
        )
    return value


CONTROLLER_TOPIC = f"{PREFIX}/controller/status"


def topic(kind: str, key: str, node: str | None = None) -> str:
    """The topic for ``kind`` in status/telemetry/ack/desired (key = node id) or results (key =
    the model's sha256, ``node`` = the publishing node's id, or an MQTT wildcard ``+`` / ``#``
    to subscribe)."""
    if kind == "results":
        if node is None:
            raise ConfigError("The 'node' parameter of topic is needed for results: the id of "
                              "the node that publishes them, or '+' / '#' to subscribe.")
        return f"{PREFIX}/results/{key}/{node}"
    if kind not in ("status", "telemetry", "ack", "desired"):
        raise ConfigError(
            f"The 'kind' parameter of topic must be one of 'ack', 'desired', 'results', "
            f"'status', 'telemetry'. Got {kind!r} instead."
        )
    return f"{PREFIX}/nodes/{key}/{kind}"


def result_from_topic(name: str) -> tuple[str, str] | None:
    """``edgeslim/results/SHA/NODE`` -> (SHA, NODE); None for any other topic."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == PREFIX and parts[1] == "results":
        return parts[2], parts[3]
    return None


def node_from_topic(name: str) -> tuple[str, str] | None:
    """``edgeslim/nodes/NODE/KIND`` -> (NODE, KIND); None for any other topic."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == PREFIX and parts[1] == "nodes":
        return parts[2], parts[3]
    return None


def parse_labels(text: str | None) -> dict[str, str]:
    """``"k=v,k2=v2"`` -> dict. Keys are [A-Za-z0-9_.-]{1,64}; values may not hold ',' or '='."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _LABEL_KEY.fullmatch(key) or "=" in value:
            raise ConfigError(
                f"The 'labels' parameter must be comma-separated key=value pairs with keys "
                f"from [A-Za-z0-9_.-]. Got {item!r} in {text!r} instead."
            )
        out[key] = value
    return out


def encode(message: Any) -> bytes:
    """A message dataclass (or a plain dict) -> compact UTF-8 JSON bytes."""
    data = message.to_dict() if hasattr(message, "to_dict") else message
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode(payload: bytes | str) -> dict[str, Any]:
    """UTF-8 JSON object bytes -> dict; ``ProtocolError`` on anything else."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"A fleet message must be a UTF-8 JSON object: {exc}") from exc
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise ProtocolError(f"A fleet message holds a value JSON cannot carry here: {exc}") from exc
    except RecursionError:
        raise ProtocolError("A fleet message is nested too deeply to be read.") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"A fleet message must be a JSON object. Got {type(data).__name__}.")
    return data


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"The {what} message field {key!r} is missing or malformed: {value!r}")
    return value


@dataclass(frozen=True)
class ModelRef:
    """The model a node serves: V2 name, version, model sha256 and bundle sha256.

    ``sha256`` is the manifest's hash of model.onnx (two bundles holding the same model share
    it: peers offload by it); ``bundle`` is the hash of the ``.eslim`` file, which content-
    addresses it on the controller and is what a desired state names.
    """

    name: str
    version: str
    sha256: str
    bundle: str

    @classmethod
    def from_dict(cls, data: Any) -> ModelRef | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ProtocolError(f"A model reference must be an object. Got {data!r}")
        return cls(
            name=_get(data, "name", str, "model"),
            version=str(data.get("version", "")),
            sha256=check_sha256(_get(data, "sha256", str, "model")),
            bundle=check_sha256(_get(data, "bundle", str, "model"), "bundle"),
        )


@dataclass(frozen=True)
class Status:
    """A node's retained status: its registration and heartbeat.

    ``state`` is a ``NodeState`` value (or ``"offline"`` from the last will); ``health`` is
    ``"ok"``, ``"degraded"`` (last install failed, still serving) or ``"down"`` (no model);
    ``queue`` is the number of inference requests in flight (>= 0); ``http`` its V2 base URL
    (``http(s)://HOST[:PORT]``, no path or query; "" when it serves none); ``ts`` is Unix
    seconds; ``heartbeat_s`` the seconds between its heartbeats (0: not said), so that peers
    know when its status is stale.
    """

    id: str
    state: str
    health: str = "down"
    labels: dict[str, str] = field(default_factory=dict)
    model: ModelRef | None = None
    http: str = ""
    queue: int = 0
    ts: float = 0.0
    heartbeat_s: float = 0.0
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Status:
        labels = data.get("labels") or {}
        if not isinstance(labels, dict):
            raise ProtocolError(f"The status field 'labels' must be an object. Got {labels!r}")
        http = str(data.get("http", "") or "")
        if http and not (_HTTP_BASE.fullmatch(http) and _port_ok(http)):
            raise ProtocolError("The status field 'http' must be a base URL, "
                                f"http(s)://HOST[:PORT] (no path or query). Got {http!r}"[:300])
        queue = _number(data, "queue", int)
        if not 0 <= queue <= 2**31:
            raise ProtocolError(f"The status field 'queue' must be in [0, 2**31]. Got {queue!r}")
        heartbeat = _number(data, "heartbeat_s", float)
        if not 0.0 <= heartbeat <= 86400.0:
            raise ProtocolError("The status field 'heartbeat_s' must be in [0, 86400]. "
                                f"Got {heartbeat!r}")
        return cls(
            id=check_node_id(_get(data, "id", str, "status")),
            state=_get(data, "state", str, "status"),
            health=str(data.get("health", "down")),
            labels={str(k): str(v) for k, v in labels.items()},
            model=ModelRef.from_dict(data.get("model")),
            http=http,
            queue=queue,
            ts=_number(data, "ts", float),
            heartbeat_s=heartbeat,
        )


def _port_ok(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError when out of range
    except ValueError:
        return False
    return True


def _number(data: dict[str, Any], key: str, kind: type) -> Any:
    """``data[key]`` as ``kind`` (0 when absent); anything else is a ``ProtocolError``."""
    value = data.get(key, 0) or 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"The status field {key!r} must be a number. Got {value!r}")
    try:
        return kind(value)
    except (OverflowError, ValueError):  # inf or nan as an int
        raise ProtocolError(f"The status field {key!r} must be a finite number. "
                            f"Got {value!r}") from None


@dataclass(frozen=True)
class Desired:
    """What the controller wants a node to serve.

    ``sha256`` is the bundle to serve (fetched from ``GET /bundles/SHA`` on the controller),
    ``deployment`` the id of the deployment that set it, ``size`` the bundle's byte size (0:
    not said); a node downloads no more than that.
    """

    deployment: int
    sha256: str
    name: str = ""
    size: int = 0
    rollback: bool = False
    ts: float = 0.0
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Desired:
        size = data.get("size", 0) or 0
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(f"The desired field 'size' must be a byte count >= 0 (0: not "
                                f"said). Got {size!r}"[:200])
        return cls(
            deployment=_get(data, "deployment", int, "desired"),
            sha256=check_sha256(_get(data, "sha256", str, "desired")),
            name=str(data.get("name", "")),
            size=size,
            rollback=bool(data.get("rollback", False)),
            ts=float(data.get("ts", 0.0) or 0.0),
        )


@dataclass(frozen=True)
class Record:
    """One outbox record: unique ``id``, node-local ``seq`` (ordering), ``kind``, ``body``."""

    id: str
    seq: int
    kind: str
    ts: float
    body: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        kind = _get(data, "kind", str, "record")
        if kind not in RECORD_KINDS:
            raise ProtocolError(f"Unknown record kind {kind!r}; allowed: {RECORD_KINDS}")
        body = data.get("body")
        if not isinstance(body, dict):
            raise ProtocolError(f"The record field 'body' must be an object. Got {body!r}")
        return cls(
            id=_get(data, "id", str, "record"),
            seq=_get(data, "seq", int, "record"),
            kind=kind,
            ts=float(_get(data, "ts", (int, float), "record")),
            body=body,
        )


@dataclass(frozen=True)
class Batch:
    """A run of consecutive outbox records from one node, oldest first."""

    node: str
    records: list[Record]
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"v": self.v, "node": self.node, "records": [r.to_dict() for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Batch:
        records = _get(data, "records", list, "batch")
        return cls(
            node=check_node_id(_get(data, "node", str, "batch")),
            records=[Record.from_dict(r) for r in records if isinstance(r, dict)],
        )


@dataclass(frozen=True)
class Ack:
    """The controller saved (committed) these record ids."""

    ids: list[str]
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ack:
        ids = _get(data, "ids", list, "ack")
        return cls(ids=[str(i) for i in ids])


@dataclass(frozen=True)
class Result:
    """An inference result shared on ``edgeslim/results/SHA/NODE``: outputs only, never
    inputs."""

    node: str
    model_sha: str
    request_id: str
    outputs: Any
    ts: float = field(default_factory=time.time)
    v: int = PROTOCOL_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        return cls(
            node=check_node_id(_get(data, "node", str, "result")),
            model_sha=check_sha256(_get(data, "model_sha", str, "result"), "model_sha"),
            request_id=_get(data, "request_id", str, "result"),
            outputs=data.get("outputs"),
            ts=float(_get(data, "ts", (int, float), "result")),
        )


@dataclass(frozen=True)
class BrokerURL:
    """``mqtt://USER:PASS@HOST:PORT`` parsed; the password is percent-decoded."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ConfigError(
                "The '--broker' option must be a URL like mqtt://USER:PASS@HOST:PORT "
                f"(TLS is not supported yet). Got {_redact(url)!r} instead."
            )
        try:
            port = parts.port or 1883
        except ValueError as exc:
            raise ConfigError(f"The broker URL has a bad port: {_redact(url)!r}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"mqtt://{user}{self.host}:{self.port}"


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
