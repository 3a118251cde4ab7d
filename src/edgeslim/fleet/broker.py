"""Start and stop a private Mosquitto broker (tests, the demo, the scale bench).

``Broker`` writes a config, a password file (hashed by ``mosquitto_passwd -U``, so no
password appears on a command line) and an ACL into a directory, then runs ``mosquitto`` on
127.0.0.1 at a free port. The ACL confines a node to its own topics: the MQTT client id must
be the node id, a node may publish only its own status and telemetry and read only its own
desired state and acks, plus every status (peer discovery) and the shared results topics.

The ACL keys on the client id, which a client chooses: with one user shared by the nodes,
any of them can connect under another node's id (or the controller's, knocking it off) and
speak for it. ``Broker.for_fleet(node_ids)`` gives each node its own user, named by its id,
and sets ``use_username_as_clientid``, so the broker takes the client id from the login and
a node can be no one but itself; the demo runs that way. The tests and the scale bench keep
one shared node user (``Broker(users)``; option off by default).

A production fleet runs its own broker (or a cluster); this class is for one machine.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeslim.errors import ConfigError, MissingDependencyError

__all__ = ["INSTALL_HINT", "Broker", "free_port", "mosquitto_path"]

INSTALL_HINT = (
    "The fleet needs the Mosquitto MQTT broker, which is not installed. Install it with: "
    "sudo apt-get install mosquitto  (Debian/Ubuntu; macOS: brew install mosquitto), or point "
    "--broker at any MQTT 5 broker you run."
)

_ACL = """\
# edgeslim fleet ACL: the controller sees everything; a node (client id = node id) only its own.
user {controller}
topic readwrite edgeslim/#

pattern write edgeslim/nodes/%c/status
pattern write edgeslim/nodes/%c/telemetry
pattern read edgeslim/nodes/%c/desired
pattern read edgeslim/nodes/%c/ack
pattern read edgeslim/nodes/+/status
pattern read edgeslim/controller/status
pattern write edgeslim/results/+/%c
pattern read edgeslim/results/#
"""


def mosquitto_path() -> str:
    """Path of the ``mosquitto`` executable; ``MissingDependencyError`` with the fix if absent."""
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MissingDependencyError(INSTALL_HINT)


def _passwd_path() -> str:
    for candidate in (shutil.which("mosquitto_passwd"), "/usr/bin/mosquitto_passwd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MissingDependencyError(INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Broker:
    """A Mosquitto process on 127.0.0.1 with password authentication and the fleet ACL.

    ``users`` maps user name -> password; ``controller_user`` names the one user allowed on
    every topic; ``options`` are extra ``mosquitto.conf`` lines (``"max_packet_size 65536"``).
    ``use_username_as_clientid`` makes every client's id its user name (then a node's user
    must be named by its node id; see ``for_fleet``).
    ``start()`` blocks until the port accepts connections; ``kill()`` sends SIGKILL (an
    outage), ``start()`` again reuses the same port and files.

    >>> with Broker({"controller": "c", "node": "n"}) as b:   # doctest: +SKIP
    ...     url = b.url("node")
    """

    def __init__(
        self,
        users: dict[str, str],
        *,
        controller_user: str = "controller",
        port: int | None = None,
        workdir: str | os.PathLike[str] | None = None,
        acl: bool = True,
        options: Sequence[str] = (),
        use_username_as_clientid: bool = False,
    ) -> None:
        if controller_user not in users:
            raise ConfigError(
                f"The 'controller_user' parameter of Broker must be one of the users "
                f"{sorted(users)}. Got {controller_user!r} instead."
            )
        for name in users:
            if not name or ":" in name or any(c.isspace() for c in name):
                raise ConfigError(
                    f"A broker user name may not be empty or hold ':' or spaces: {name!r}"
                )
        self.users = dict(users)
        self.controller_user = controller_user
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="edgeslim-broker-"))
        self.acl = acl
        self.options = [str(o) for o in options]
        for line in self.options:
            if "\n" in line or "\r" in line:
                raise ConfigError(f"A broker option must be one line. Got {line!r} instead.")
        self.use_username_as_clientid = bool(use_username_as_clientid)
        self._proc: subprocess.Popen[bytes] | None = None
        self._written = False

    @classmethod
    def for_fleet(
        cls, node_ids: Sequence[str], *, controller_user: str = "controller", **kw: Any
    ) -> Broker:
        """A broker with one user per node, named by its id, and one for the controller (random
        passwords), with ``use_username_as_clientid`` on: a node's login fixes its identity.
        ``kw`` goes to ``Broker`` (``port``, ``workdir``, ``options``...)."""
        from edgeslim.fleet.protocol import check_node_id

        for node in node_ids:
            check_node_id(node, "Broker.for_fleet")
        if controller_user in node_ids or len(set(node_ids)) != len(node_ids):
            raise ConfigError(f"The 'node_ids' parameter of Broker.for_fleet must be distinct "
                              f"and hold no {controller_user!r} (the controller's user). Got "
                              f"{list(node_ids)!r} instead."[:300])
        users = {controller_user: os.urandom(12).hex(), **{n: os.urandom(12).hex()
                                                           for n in node_ids}}  # fmt: skip
        return cls(users, controller_user=controller_user, use_username_as_clientid=True, **kw)

    # ---------------------------------------------------------------- files
    def _write_files(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        pw = self.dir / "passwd"
        fd = os.open(pw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            for user, password in self.users.items():
                f.write(f"{user}:{password}\n")
        subprocess.run([_passwd_path(), "-U", str(pw)], check=True, capture_output=True)
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            f"password_file {pw}",
            # Run as whoever started us: no switch to a 'mosquitto' user that cannot read dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "persistence false",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"log_dest file {self.dir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            *(["use_username_as_clientid true"] if self.use_username_as_clientid else []),
            *self.options,
        ]
        if self.acl:
            (self.dir / "acl").write_text(_ACL.format(controller=self.controller_user))
            lines.append(f"acl_file {self.dir / 'acl'}")
        (self.dir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        self._written = True

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 10.0) -> Broker:
        """Start Mosquitto (writing its files the first time); wait until the port accepts."""
        if self.running:
            return self
        exe = mosquitto_path()
        if not self._written:
            self._write_files()

        def _raise_fd_limit() -> None:  # many clients (the scale bench) need many sockets
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

        out = open(self.dir / "stdout.log", "ab")  # noqa: SIM115 - handed to the child
        self._proc = subprocess.Popen(
            [exe, "-c", str(self.dir / "mosquitto.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_raise_fd_limit,
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log = (self.dir / "stdout.log").read_text(errors="replace")[-2000:]
                raise ConfigError(f"mosquitto exited at start (port {self.port}):\n{log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not open port {self.port} within {timeout} s")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILL the broker (simulates a crash or a network outage); ``start()`` revives it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL when it does not exit in ``timeout`` seconds."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def close(self) -> None:
        """Stop and remove the working directory when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, user: str) -> str:
        """``mqtt://USER:PASS@127.0.0.1:PORT`` for one of the configured users."""
        from urllib.parse import quote

        if user not in self.users:
            raise ConfigError(f"Unknown broker user {user!r}; configured: {sorted(self.users)}")
        auth = f"{quote(user, safe='')}:{quote(self.users[user], safe='')}"
        return f"mqtt://{auth}@{self.host}:{self.port}"

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
