"""A Python client of the controller's HTTP API (``fleet/api.py``), torch-free.

What ``edgeslim fleet deploy``, ``status`` and ``rollback`` do, from Python; those verbs are
thin wrappers over this class::

    from edgeslim.fleet.client import FleetClient

    with FleetClient("http://127.0.0.1:8700") as fleet:
        row = fleet.deploy("model.eslim", selector={"site": "lab"}, canary=0.5, soak_s=5.0)
        row = fleet.wait(row["id"], timeout=300)   # succeeded, rolled_back or failed
        nodes = fleet.nodes()
        fleet.wait(fleet.rollback()["id"])         # the latest deployment

Answers are the API's JSON, as plain dicts and lists. Errors are the project's own, never an
httpx exception: ``ConfigError`` for bad input, for a request the controller refused (its
HTTP status and message quoted) and for a URL whose answers are not an edgeslim
controller's; ``UnreachableError`` when the controller does not answer; ``StillRunningError``
when ``wait`` runs out (the deployment goes on). A controller started with a token needs
``FleetClient(url, token=...)``: without it every call but ``health`` is refused (HTTP 401).
"""

from __future__ import annotations

import numbers
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeslim._text import visible
from edgeslim._validate import check_choice, check_positive
from edgeslim.errors import ConfigError, StillRunningError, UnreachableError
from edgeslim.fleet.rollout import FINAL_STATES

__all__ = ["FINAL_STATES", "FleetClient"]

DEPLOYMENT_KEYS = ("id", "state", "reason", "targets")  # what every deployment row holds
NODE_KEYS = ("id", "labels", "health", "state")
POLL_S = 0.3  # how often ``wait`` asks
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_url(url: Any, name: str = "url") -> str:
    """``url`` without trailing slashes when it can be a controller's base URL
    (``http(s)://HOST[:PORT][/PREFIX]``); else a ``ConfigError`` that calls it ``name``."""
    import httpx

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be an http(s) URL (http://HOST:PORT). Got {url!r} "
                          "instead.")  # fmt: skip
    try:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not 0-65535
        if not parts.hostname or re.search(r"[\s%]", parts.hostname):
            raise ValueError("no host name, or a bad one")
        if parts.query or parts.fragment or url.endswith(("?", "#")):
            raise ValueError("a base URL has no query or fragment")
        base = url.rstrip("/")
        # what httpx refuses only when it sends (an IDNA host such as 'xn--') is refused now
        with httpx.Client(base_url=base) as probe:
            probe.build_request("GET", "/healthz")
    except (ValueError, httpx.InvalidURL) as exc:  # idna's errors are ValueErrors too
        raise ConfigError(f"{name} {url!r} is not a valid URL ({exc}); give "
                          "http://HOST:PORT.") from None  # fmt: skip
    return base


def deployment_ref(value: Any, name: str = "deployment") -> str:
    """A deployment as the API names it in a path: its id (a positive int, or such a string)
    or ``'latest'``; else a ``ConfigError`` that calls it ``name``."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        value = str(int(value))
    if not isinstance(value, str) or not (
        value == "latest" or re.fullmatch(r"[1-9][0-9]{0,17}", value)
    ):
        raise ConfigError(f"{name} must be a deployment id (a positive integer) or 'latest'. "
                          f"Got {value!r} instead.")  # fmt: skip
    return value


class FleetClient:
    """The controller at ``url`` (``http(s)://HOST:PORT``); ``timeout``: seconds per request;
    ``token``: the bearer token of a controller started with one (``--token`` or
    ``EDGESLIM_FLEET_TOKEN``), sent as ``Authorization: Bearer TOKEN`` with every request.

    Use it as a context manager, or call ``close()``. The URL is checked here; nothing is
    sent until a method is called.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, token: str | None = None) -> None:
        import httpx

        from edgeslim.edge.auth import bearer, check_token

        self.url = check_url(url, "url")
        self.timeout = check_positive(timeout, "timeout", "FleetClient")
        headers = {}
        if check_token(token, "FleetClient") is not None:
            headers["Authorization"] = bearer(token)  # the value BearerAuth compares with
        self._http = httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers)

    def __repr__(self) -> str:
        return f"FleetClient({self.url!r})"

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ reads
    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"ok": true, "broker": "connected", "time": ...}``."""
        return self._request("GET", "/healthz", keys=("ok", "broker"))

    def nodes(self) -> list[dict[str, Any]]:
        """``GET /nodes``: every node, with ``online`` and ``age_s`` (seconds since heard)."""
        return self._request("GET", "/nodes", keys=NODE_KEYS, many=True)

    def bundles(self) -> list[dict[str, Any]]:
        """``GET /bundles``: stored bundles (sha256, name, version, size, verified, added)."""
        return self._request("GET", "/bundles", keys=("sha256",), many=True)

    def deployments(self) -> list[dict[str, Any]]:
        """``GET /deployments``: every deployment with its targets."""
        return self._request("GET", "/deployments", keys=DEPLOYMENT_KEYS, many=True)

    def deployment(self, deployment: int | str = "latest") -> dict[str, Any]:
        """``GET /deployments/ID``: one deployment (``'latest'``: the newest)."""
        ref = deployment_ref(deployment)
        return self._request("GET", f"/deployments/{ref}", keys=DEPLOYMENT_KEYS)

    def records(
        self, *, node: str | None = None, kind: str | None = None, since: float = 0.0
    ) -> list[dict[str, Any]]:
        """``GET /records``: stored records received at or after ``since`` (Unix seconds), of
        one ``node`` and one ``kind`` (telemetry, report, result, event) when given."""
        from edgeslim.fleet.protocol import RECORD_KINDS

        params: dict[str, str] = {}
        if node is not None:
            if not isinstance(node, str) or not node:
                raise ConfigError("The 'node' parameter of records must be a node id or None. "
                                  f"Got {node!r} instead.")  # fmt: skip
            params["node"] = node
        if kind is not None:
            params["kind"] = check_choice(kind, "kind", "records", RECORD_KINDS)
        params["since"] = repr(check_positive(since, "since", "records", allow_zero=True))
        return self._request("GET", "/records", params=params, keys=("node", "kind", "body"),
                             many=True)  # fmt: skip

    # ------------------------------------------------------------------ writes
    def upload(self, bundle: str | os.PathLike[str] | bytes, *, force: bool = False
               ) -> dict[str, Any]:  # fmt: skip
        """``POST /bundles``: store a ``.eslim`` (a path or its bytes); returns ``{sha256,
        name, version, size, verified}``. The controller refuses a bundle its key does not
        verify (HTTP 422) unless ``force``; every node still verifies it."""
        data = self._bundle_bytes(bundle, "upload")
        return self._upload(data, force)

    def deploy(
        self,
        bundle: str | os.PathLike[str] | bytes,
        selector: Mapping[str, Any] | str | None = None,
        *,
        force: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """Roll ``bundle`` out to the nodes whose labels hold ``selector``; returns the new
        deployment's row at once (``wait`` follows it to its end).

        ``bundle``: a ``.eslim`` path or its bytes (uploaded first), or the sha256 of a bundle
        the controller stores. ``selector``: labels such as ``{"site": "lab"}`` (or
        ``"site=lab"``); none: every online node. ``params``: ``RolloutParams`` fields
        (``canary``, ``soak_s``, ``install_timeout_s``, ``max_error_rate``, ``max_p99_ratio``,
        ``p99_slack_ms``, ``min_requests``, ``max_failures``, ``parallel``,
        ``allow_downgrade``, ``allow_model_change``), checked as the controller checks them,
        before anything is uploaded. The controller refuses (409) a bundle whose version is
        lower than what a target serves unless ``allow_downgrade=True``, and one of another
        model (by name) unless ``allow_model_change=True``.
        """
        from edgeslim.fleet.protocol import parse_labels
        from edgeslim.fleet.rollout import RolloutParams

        if not isinstance(force, bool):
            raise ConfigError(f"The 'force' parameter of deploy must be a bool. Got {force!r} "
                              "instead.")  # fmt: skip
        checked = RolloutParams.from_dict({**params, "force": force}).to_dict()
        if isinstance(selector, str):
            labels = parse_labels(selector)
        elif selector is None or isinstance(selector, Mapping):
            labels = {str(k): str(v) for k, v in (selector or {}).items()}
        else:
            raise ConfigError("The 'selector' parameter of deploy must be a dict of labels "
                              f"such as {{'site': 'lab'}}. Got {selector!r} instead.")  # fmt: skip
        if isinstance(bundle, str) and _SHA256.fullmatch(bundle) and not Path(bundle).exists():
            sha = bundle
        else:
            sha = str(self._upload(self._bundle_bytes(bundle, "deploy"), force)["sha256"])
        body = {"bundle": sha, "selector": labels, "params": checked}
        return self._request("POST", "/deployments", json=body, keys=DEPLOYMENT_KEYS)

    def rollback(self, deployment: int | str = "latest") -> dict[str, Any]:
        """``POST /deployments/ID/rollback``: every node the deployment touched goes back to
        its previous bundle. Only the latest deployment can be rolled back (HTTP 409 for an
        older one). Returns its row as it was when asked; ``wait`` follows the rollback."""
        ref = deployment_ref(deployment)
        return self._request("POST", f"/deployments/{ref}/rollback", keys=("id",))

    def wait(self, deployment: int | str = "latest", *, timeout: float = 600.0
             ) -> dict[str, Any]:  # fmt: skip
        """The deployment's row once it is final: ``succeeded``, ``rolled_back`` or
        ``failed``. ``StillRunningError`` when ``timeout`` seconds pass first (it goes on).
        ``'latest'`` is the newest deployment when ``wait`` is called: the one followed, even
        if a newer one starts meanwhile."""
        ref = deployment_ref(deployment)
        check_positive(timeout, "timeout", "wait")
        deadline = time.monotonic() + timeout
        while True:
            row = self._request("GET", f"/deployments/{ref}", keys=DEPLOYMENT_KEYS)
            ref = deployment_ref(row["id"])  # 'latest' resolved once, by the first answer
            if row["state"] in FINAL_STATES:
                return dict(row)
            if time.monotonic() > deadline:
                raise StillRunningError(
                    f"Deployment {row['id']} is still {row['state']} after {timeout:g} s; it "
                    f"goes on (follow it with 'edgeslim fleet status --controller {self.url}' "
                    f"or GET {self.url}/deployments/{row['id']}).")
            time.sleep(POLL_S)

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _bundle_bytes(bundle: Any, func: str) -> bytes:
        if isinstance(bundle, (bytes, bytearray)):
            return bytes(bundle)
        if not isinstance(bundle, (str, os.PathLike)):
            raise ConfigError(f"The 'bundle' parameter of {func} must be a .eslim path or its "
                              f"bytes. Got {type(bundle).__name__} instead.")  # fmt: skip
        path = Path(bundle)
        if not path.is_file():
            what = "a .eslim file or its bytes"
            if func == "deploy":
                what = "a .eslim file, its bytes or the sha256 of a bundle the controller stores"
            raise ConfigError(f"The 'bundle' parameter of {func} must be {what}. Got "
                              f"{str(bundle)!r} instead, which is not a file.")  # fmt: skip
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"Cannot read the bundle {str(bundle)!r}: {exc}") from None

    def _upload(self, data: bytes, force: bool) -> dict[str, Any]:
        return self._request("POST", "/bundles", content=data,
                             params={"force": "1" if force else "0"}, keys=("sha256",))  # fmt: skip

    def _request(
        self, method: str, path: str, *, keys: tuple[str, ...] = (), many: bool = False,
        **kw: Any,
    ) -> Any:
        """The JSON answer of the controller: an object holding ``keys`` (with ``many``, a
        list of such objects); anything else means the URL is not an edgeslim controller."""
        import httpx

        try:
            r = self._http.request(method, path, **kw)
        except (httpx.LocalProtocolError, httpx.UnsupportedProtocol) as exc:
            # refused here, before anything was sent: no retry or other network helps. The
            # message can quote a header, the token's included: its type is named instead.
            raise ConfigError(f"Cannot send {method} {path} to {self.url}: httpx refused the "
                              f"request ({type(exc).__name__}); check the URL and the token."
                              ) from None  # fmt: skip
        except httpx.HTTPError as exc:
            raise UnreachableError(f"Cannot reach the controller at {self.url}: {exc}"
                                   ) from None  # fmt: skip
        except (httpx.InvalidURL, ValueError) as exc:  # check_url refuses such URLs first
            raise ConfigError(f"Cannot send {method} {path} to {self.url!r}: {exc}") from None
        try:
            doc = r.json()
        except ValueError:  # HTML, plain text, nothing
            doc = None
        if r.status_code >= 400:
            msg = doc.get("error", r.text) if isinstance(doc, dict) else r.text
            hint = ""
            if r.status_code == 401:
                hint = (" (give the controller's token: FleetClient(url, token=...), or --token "
                        "or EDGESLIM_FLEET_TOKEN for the fleet verbs)")
            raise ConfigError(f"The controller answered {r.status_code}: "
                              f"{visible(str(msg)[:500])}{hint}")  # fmt: skip

        def fits(item: Any) -> bool:
            return isinstance(item, dict) and all(k in item for k in keys)

        ok = (isinstance(doc, list) and all(fits(i) for i in doc)) if many else fits(doc)
        if not ok:
            what = "JSON of another shape" if doc is not None else "something that is not JSON"
            raise ConfigError(f"{self.url} is not an edgeslim controller: {method} {path} "
                              f"answered {what} (HTTP {r.status_code}).")  # fmt: skip
        return doc
