"""A single-node Apache Kafka 4.0 broker (KRaft) from its jars on Maven Central.

``compose/kafka/pom.xml`` names the broker's classpath; ``KafkaServer.ensure_jars()`` copies
it once with Maven into ``<cache>/kafka/libs`` (``<cache>`` = ``$HUB_CACHE_DIR`` or the
project's ``.cache``) and marks the copy complete, so later runs skip Maven.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient

from hub.stack._process import ManagedProcess, StackError, free_port, run_coroutine

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POM = PROJECT_ROOT / "compose" / "kafka" / "pom.xml"
STARTED_MESSAGE = "Kafka Server started"
_MARKER = ".complete"
_MAVEN_TIMEOUT = 900.0

_LOG4J2_XML = """\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
  </Loggers>
</Configuration>
"""


class KafkaUnavailable(StackError):
    """Kafka cannot run here (no Java/Maven, the jars cannot be fetched, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cache_dir() -> Path:
    return Path(os.environ.get("HUB_CACHE_DIR") or PROJECT_ROOT / ".cache")


def _random_cluster_id() -> str:
    """What ``kafka.tools.StorageTool random-uuid`` prints (``Uuid.randomUuid()``).

    16 random bytes, URL-safe base64 without padding; Kafka rejects ids that start with
    '-' and the two reserved ids (all zero, and zero with a final 1). Computed here to save
    a JVM start.
    """
    while True:
        raw = secrets.token_bytes(16)
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if not text.startswith("-") and int.from_bytes(raw, "big") > 1:
            return text


class KafkaServer(ManagedProcess):
    """``kafka.Kafka`` as combined broker+controller on 127.0.0.1 (data in ``data_dir``)."""

    name = "kafka"
    start_timeout = 60.0
    stop_timeout = 30.0
    poll_interval = 0.1

    def __init__(
        self, data_dir: Path, port: int | None = None, *, controller_port: int | None = None
    ) -> None:
        super().__init__(data_dir, port)
        self.controller_port = free_port() if controller_port is None else controller_port
        self.properties_path = self.data_dir / "server.properties"
        self.log4j_path = self.data_dir / "log4j2.xml"
        self.log_dir = self.data_dir / "kraft-logs"
        self._libs: Path | None = None
        self._started_seen = False

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    # -- jars ----------------------------------------------------------------------------------

    @staticmethod
    def ensure_jars() -> Path:
        """The folder of the broker's jars, copied there by Maven first if needed."""
        libs = cache_dir() / "kafka" / "libs"
        if not POM.is_file():
            raise KafkaUnavailable(f"{POM} is missing (it comes with the project's sources)")
        fingerprint = hashlib.sha256(POM.read_bytes()).hexdigest()
        marker = libs / _MARKER
        libs.parent.mkdir(parents=True, exist_ok=True)
        with (libs.parent / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one Maven run at a time across processes
            if marker.is_file() and marker.read_text().strip() == fingerprint:
                return libs
            mvn = shutil.which("mvn")
            if mvn is None:
                raise KafkaUnavailable("Maven ('mvn') is not on PATH: cannot fetch Kafka's jars")
            shutil.rmtree(libs, ignore_errors=True)
            command = [
                mvn, "-q", "-B", "-f", str(POM),
                f"-Dmaven.repo.local={cache_dir() / 'm2'}",
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={libs}",
            ]  # fmt: skip
            try:
                done = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=_MAVEN_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise KafkaUnavailable(
                    f"Maven did not fetch Kafka's jars within {_MAVEN_TIMEOUT:.0f} s"
                ) from None
            if done.returncode != 0 or not any(libs.glob("kafka_*.jar")):
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
                raise KafkaUnavailable(
                    f"Maven could not fetch Kafka's jars (exit code {done.returncode}):\n{tail}"
                )
            marker.write_text(fingerprint + "\n")
            return libs

    # -- lifecycle hooks ------------------------------------------------------------------

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise KafkaUnavailable("Java ('java', 17 or newer) is not on PATH")
        return java

    def _classpath(self) -> str:
        assert self._libs is not None
        return f"{self._libs}/*"

    def _prepare(self) -> None:
        self._libs = self.ensure_jars()
        self.log4j_path.write_text(_LOG4J2_XML)
        self.properties_path.write_text(self._properties())
        if (self.log_dir / "meta.properties").is_file():
            return  # formatted before: keep its cluster id and data
        command = [
            self._java(), "-cp", self._classpath(), "kafka.tools.StorageTool",
            "format", "-t", _random_cluster_id(), "-c", str(self.properties_path),
        ]  # fmt: skip
        env = {**os.environ, "KAFKA_LOG4J_OPTS": f"-Dlog4j2.configurationFile={self.log4j_path}"}
        done = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, env=env
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise StackError(f"kafka-storage format failed (exit code {done.returncode}):\n{tail}")

    def _properties(self) -> str:
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{self.host}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "6",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # A restart on a reused data dir waits until the previous incarnation's broker
            # session expires (9 s by default): keep that short for a single local node.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            # The event log is a compacted topic: let the cleaner look for work every
            # second instead of every 15 s, so a local broker stays small.
            "log.cleaner.backoff.ms": "1000",
        }
        return "".join(f"{key}={value}\n" for key, value in settings.items())

    def _command(self) -> list[str]:
        return [
            self._java(),
            "-Xms512m", "-Xmx512m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.log4j_path}",
            "-cp", self._classpath(),
            "kafka.Kafka", str(self.properties_path),
        ]  # fmt: skip

    def spawn(self) -> None:
        self._started_seen = False
        super().spawn()

    def _ready(self) -> bool:
        if not self._started_seen:
            self._started_seen = STARTED_MESSAGE in self.log_path.read_text(errors="replace")
            if not self._started_seen:
                return False
        run_coroutine(self._list_topics, timeout=15)
        return True

    async def _list_topics(self) -> list[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            return list(await admin.list_topics())
        finally:
            await admin.close()
