"""One broker connection with an explicit state, capped backoff and a clean shutdown.

paho-mqtt 2.x speaks the protocol; this module owns what a long-running agent needs around it
(paho's own ``loop_forever`` retries without jitter and resets its delay on a TCP connect, so
the reconnect loop is written here):

- one ``LinkState`` at a time: CONNECTING -> CONNECTED -> BACKOFF -> CONNECTING ... -> CLOSED;
- ``Backoff.reset()`` only on a CONNACK that accepted the session;
- the first connection is handled apart: wrong credentials there (CONNACK 0x86 bad user
  name or password, 0x87 not authorized, 0x85 client id not valid, 0x8C bad authentication
  method) are the user's mistake and ``start(wait=...)`` raises ``ConfigError``; a broker
  that is merely unreachable, or refuses for a passing reason (0x89 server busy, 0x97 quota
  exceeded, ...), is retried in the background (an edge node must come up and serve while
  its broker is away);
- subscriptions are renewed on every CONNACK (clean sessions); the link is CONNECTED only
  once the broker's SUBACK has come back (a message published before that would not reach
  this client: MQTT delivers only to subscriptions that exist), after which ``on_connected``
  runs so the owner can republish its retained state and resume its outbox. A broker that
  does not answer the SUBSCRIBE within ``SUBACK_TIMEOUT_S`` is dropped and retried;
- every wait is an ``Event.wait`` that ``stop()`` interrupts.

Callbacks run on the link's network thread: they must not block.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edgeslim.errors import ConfigError, MissingDependencyError
from edgeslim.fleet.backoff import Backoff, LinkState, wait_or_stop
from edgeslim.fleet.protocol import BrokerURL

__all__ = ["MqttLink"]

log = logging.getLogger("edgeslim.fleet.link")

MessageHandler = Callable[[str, bytes], None]

# CONNACK reason codes that no retry can cure: the --broker URL (or the broker's user list)
# is wrong. Any other refusal (server busy, unavailable, quota exceeded) is retried.
CREDENTIAL_REFUSALS = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}


# How long a connection may wait for its SUBACK before the link drops it and reconnects.
SUBACK_TIMEOUT_S = 10.0


def _paho() -> Any:
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:  # pragma: no cover - the edge extra carries it
        raise MissingDependencyError(
            "The fleet needs the Python package 'paho-mqtt' (2.x). "
            "Install it with: pip install 'edgeslim[edge]'"
        ) from exc
    return mqtt


class MqttLink:
    """A paho client driven by one thread that reconnects with capped, jittered backoff.

    ``subscriptions`` are ``(topic_filter, qos)`` pairs renewed on each connect; ``will`` is
    ``(topic, payload, qos, retain)`` published by the broker if the link dies.
    """

    def __init__(
        self,
        broker: BrokerURL,
        client_id: str,
        *,
        subscriptions: Sequence[tuple[str, int]] = (),
        on_message: MessageHandler | None = None,
        on_connected: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        backoff: Backoff | None = None,
        keepalive: int = 10,
        name: str = "mqtt",
    ) -> None:
        mqtt = _paho()
        self.broker = broker
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self._on_message = on_message
        self._on_connected = on_connected
        self._on_lost = on_lost
        self.backoff = backoff or Backoff()
        self.keepalive = keepalive
        self.name = name
        self._state = LinkState.IDLE
        self._state_lock = threading.Lock()
        self._changed = threading.Condition(self._state_lock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refused: str | None = None
        self._first_refusal: str | None = None
        self._final: list[tuple[str, bytes, int, bool]] = []
        self.connects = 0  # accepted CONNACKs
        # the broker's Maximum Packet Size from the last CONNACK (None: it named none)
        self.max_packet_size: int | None = None
        self.losses = 0  # connections lost after being accepted
        # the SUBSCRIBE of this connection awaiting its SUBACK, and since when (monotonic)
        self._sub_mid: int | None = None
        self._sub_since = 0.0

        c = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if broker.username is not None:
            c.username_pw_set(broker.username, broker.password)
        if will is not None:
            c.will_set(will[0], will[1], qos=will[2], retain=will[3])
        c.on_connect = self._handle_connect
        c.on_disconnect = self._handle_disconnect
        c.on_subscribe = self._handle_subscribe
        c.on_message = self._handle_message
        c.connect_timeout = 5.0
        self._client = c

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state is LinkState.CONNECTED

    def _set_state(self, state: LinkState) -> None:
        with self._changed:
            if self._state is LinkState.CLOSED:
                return
            self._state = state
            self._changed.notify_all()

    def wait_connected(self, timeout: float) -> bool:
        """Block until CONNECTED (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._state is not LinkState.CONNECTED:
                left = deadline - time.monotonic()
                if left <= 0 or self._state is LinkState.CLOSED:
                    return False
                self._changed.wait(left)
            return True

    # ------------------------------------------------------------------ paho callbacks
    def _handle_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self._refused = str(rc)
            fatal = getattr(rc, "value", None) in CREDENTIAL_REFUSALS
            if fatal and self.connects == 0 and self._first_refusal is None:
                self._first_refusal = str(rc)
            log.warning("%s: broker %s refused the connection: %s%s", self.name, self.broker,
                        rc, "" if fatal else " (retrying)")  # fmt: skip
            with self._changed:
                self._changed.notify_all()
            return
        self.backoff.reset()  # only a CONNACK that accepted us resets the delay
        self.connects += 1
        self.max_packet_size = getattr(props, "MaximumPacketSize", None)
        if self.subscriptions:
            err, mid = client.subscribe([(t, q) for t, q in self.subscriptions])
            if err == 0:
                self._sub_mid, self._sub_since = mid, time.monotonic()
                return  # CONNECTED once the SUBACK is in (_handle_subscribe)
            log.warning("%s: subscribing failed (%s); reconnecting", self.name, err)
            self._refused = f"subscribe failed ({err})"
            return
        self._up()

    def _handle_subscribe(
        self, client: Any, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        if mid != self._sub_mid:
            return
        self._sub_mid = None
        for (t, _), code in zip(self.subscriptions, reason_codes, strict=False):
            if getattr(code, "is_failure", False):  # e.g. 0x87: the broker's ACL denies it
                log.error("%s: the broker refused the subscription to %s: %s", self.name, t,
                          code)  # fmt: skip
        self._up()

    def _up(self) -> None:
        self._set_state(LinkState.CONNECTED)
        if self._on_connected is not None:
            try:
                self._on_connected()
            except Exception:  # a bug in a callback must not kill the network thread
                log.exception("%s: on_connected failed", self.name)

    def _handle_disconnect(
        self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if self._state is LinkState.CONNECTED:
            self.losses += 1
            self._set_state(LinkState.BACKOFF)
            if self._on_lost is not None and not self._stop.is_set():
                try:
                    self._on_lost()
                except Exception:
                    log.exception("%s: on_lost failed", self.name)

    def _handle_message(self, client: Any, userdata: Any, msg: Any) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg.topic, msg.payload)
        except Exception:
            log.exception("%s: handler failed on %s", self.name, msg.topic)

    # ------------------------------------------------------------------ lifecycle
    def start(self, wait: float | None = None) -> MqttLink:
        """Start the network thread; with ``wait``, block up to that many seconds for CONNACK.

        Raises ``ConfigError`` when the broker refuses the first connection for its
        credentials (``CREDENTIAL_REFUSALS``). An unreachable or busy broker is not an error:
        the link keeps trying.
        """
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-link", daemon=True)
        self._thread.start()
        if wait:
            deadline = time.monotonic() + wait
            with self._changed:
                while self._state is not LinkState.CONNECTED and self._first_refusal is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
            if self._first_refusal is not None:
                refusal = self._first_refusal
                self.stop()
                raise ConfigError(
                    f"The MQTT broker {self.broker} refused {self.name} "
                    f"(user {self.broker.username!r}, client id {self.client_id!r}): {refusal}. "
                    "Check the user and password in --broker."
                )
            if self._state is not LinkState.CONNECTED:
                log.warning(
                    "%s: broker %s not reachable yet; retrying in the background",
                    self.name,
                    self.broker,
                )
        return self

    def _run(self) -> None:
        mqtt = _paho()
        c = self._client
        while not self._stop.is_set():
            self._set_state(LinkState.CONNECTING)
            self._refused = None
            try:
                c.connect(self.broker.host, self.broker.port, self.keepalive, clean_start=True)
            except OSError as exc:
                log.debug("%s: connect to %s failed: %s", self.name, self.broker, exc)
            else:
                self._sub_mid = None
                while not self._stop.is_set():
                    rc = c.loop(timeout=0.2)
                    if rc != mqtt.MQTT_ERR_SUCCESS or self._refused is not None:
                        break
                    waited = time.monotonic() - self._sub_since
                    if self._sub_mid is not None and waited > SUBACK_TIMEOUT_S:
                        log.warning("%s: no SUBACK from %s within %g s; reconnecting",
                                    self.name, self.broker, SUBACK_TIMEOUT_S)  # fmt: skip
                        break
                if self._stop.is_set():
                    break
                self._handle_disconnect(c, None, None, None, None)
                with contextlib.suppress(Exception):  # the socket may be gone already
                    c.disconnect()
            self._set_state(LinkState.BACKOFF)
            if wait_or_stop(self._stop, self.backoff.next_delay()):
                break
        self._shutdown()

    def _shutdown(self) -> None:
        mqtt = _paho()
        c = self._client
        if self._state is LinkState.CONNECTED:
            infos = [c.publish(t, p, qos=q, retain=r) for t, p, q, r in self._final]
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and not all(i.is_published() for i in infos):
                if c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                    break
            try:
                c.disconnect()  # a clean DISCONNECT: the broker drops the will
                c.loop(timeout=0.05)
            except Exception:
                pass
        with self._changed:
            self._state = LinkState.CLOSED
            self._changed.notify_all()

    def stop(
        self, final: Sequence[tuple[str, bytes, int, bool]] = (), timeout: float = 5.0
    ) -> None:
        """Publish ``final`` messages if connected, disconnect cleanly, join the thread."""
        self._final = list(final)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._changed:
            self._state = LinkState.CLOSED
            self._changed.notify_all()

    # ------------------------------------------------------------------ publish
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Hand a message to paho when connected; False (nothing queued) when not."""
        return self.publish_tracked(topic, payload, qos=qos, retain=retain) is not None

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Any:
        """Like ``publish``, but return paho's ``MQTTMessageInfo`` (its ``is_published()``
        turns true once the broker has the message: PUBACK for QoS 1), or None when nothing
        was queued."""
        if self._state is not LinkState.CONNECTED:
            return None
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info if info.rc == 0 else None
