"""The shape of the code, read from the source with ``ast`` (nothing is imported).

1. No import circle between the modules of ``hub/``, ``events/``, ``handlers/``,
   ``projections/`` and ``shared/``. Every import counts, at module level or inside a
   function: an import moved into a function to dodge a circle is still a circle (the
   two modules still need each other), so the need has to go, not the import.

2. Connections, the event log and the views are built in one place, ``hub/bootstrap.py``.
   Within ``hub/`` and ``bench/`` no other module calls (or subclasses) a constructor of

   * a NATS connection: ``nats.connect``, nats-py's ``Client``, ``hub.natsconn``'s
     ``connect`` / ``HubClient``;
   * PostgreSQL: ``asyncpg.connect``, ``asyncpg.create_pool``;
   * Redis: redis-py's ``Redis``, ``StrictRedis``, ``from_url``, ``from_pool``,
     ``ConnectionPool``, ``BlockingConnectionPool``;
   * Kafka: aiokafka's ``AIOKafkaProducer``, ``AIOKafkaConsumer``, ``AIOKafkaAdminClient``;
   * the event log (``JetStreamEventLog``, ``KafkaEventLog``, ``MemoryEventLog``) or a view
     (``PostgresRegistryProjection``, ``RedisRegistryProjection``);

   except where ``ALLOWED`` says, each for a reason:

   * ``hub/natsconn.py`` defines ``HubClient`` and the ``connect`` helper that bootstrap
     calls;
   * ``hub/eventlog/kafka.py`` is the Kafka log adapter: its transactional producer, its
     readers and the admin client that ensures the topic are the adapter's internals,
     built from the brokers bootstrap hands it (the JetStream log gets bootstrap's
     connection; it has nothing of its own to build);
   * ``hub/infra/checkers.py`` probes the monitored components: each check opens a short
     connection to the component under check, with the address and credentials of its
     entry in the infrastructure file, not the hub's own connections;
   * ``hub/stack/`` runs the embedded servers for ``hub dev`` and the tests: it probes a
     server it started until it answers, and asks the hub it started whether it serves;
   * ``bench/`` may open plain nats-py connections (``nats.connect``): they play the fleet
     (services that register, heartbeat and ask) and the raw baselines, which must not
     carry the hub's wiring. What a benchmark reaches of the hub itself (its database,
     its view store, its event log) comes from bootstrap like everything else.

   ``shared/`` (the client library services import) connects as a service does, and
   tests build what they test their own way; both are outside this rule. Code a
   benchmark runs from a string (a child script) is not seen.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("hub", "events", "handlers", "projections", "shared")


# --- the import graph -----------------------------------------------------------------------


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, tuple[Path, bool]]:
    """Every module of ``packages``: dotted name -> (file, whether it is a package)."""
    found: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = (path, is_package)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module a ``from ... import`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_names(module: str, is_package: bool, tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(name bound, what it names) for every import anywhere in ``tree``: ``import a.b``
    binds ``a`` to ``a``; ``import a.b as c`` binds ``c`` to ``a.b``; ``from a import b``
    binds ``b`` to ``a.b`` (a module or something in one)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    yield alias.asname, alias.name
                else:
                    head = alias.name.split(".")[0]
                    yield head, head
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                yield alias.asname or alias.name, f"{source}.{alias.name}"


def _imported_modules(module: str, is_package: bool, tree: ast.AST) -> Iterator[str]:
    """Every dotted name an import statement in ``tree`` reaches (``import a.b`` reaches
    ``a.b``; ``from a import b`` reaches ``a.b`` if that is a module, else ``a``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            yield source
            yield from (f"{source}.{alias.name}" for alias in node.names)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (module level and inside functions).

    A dotted name that is not a module of ours counts as the closest module above it
    (``from a.b import C`` -> ``a.b``); third-party and standard modules are left out.
    """
    known = modules(root, PACKAGES)

    def ours(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in known.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = {m for target in _imported_modules(name, is_package, tree) if (m := ours(target))}
        deps.discard(name)
        graph[name] = deps
    return graph


def test_the_import_graph_sees_every_kind_of_import() -> None:
    """The graph holds edges of each kind the rule counts, so an empty graph cannot pass
    for an acyclic one: module level (``hub.app`` -> ``hub.bootstrap``), ``from hub import
    natsconn`` as the module ``hub.natsconn``, and an import inside a function
    (``hub.cli`` imports ``hub.app`` only when a command runs)."""
    graph = import_graph()
    assert "hub.bootstrap" in graph["hub.app"]
    assert "hub.natsconn" in graph["hub.bootstrap"]
    assert "hub.app" in graph["hub.cli"]
    assert "events.model" in graph["handlers.registry"]


def test_no_import_circle() -> None:
    """The modules of hub/, events/, handlers/, projections/ and shared/ import one another
    without a circle, counting imports inside functions too."""
    try:
        order = list(TopologicalSorter(import_graph()).static_order())
    except CycleError as exc:
        # graphlib lists the cycle so that each node is imported by the next one;
        # reversed, each imports the next.
        circle = " -> ".join(reversed(exc.args[1]))
        raise AssertionError(f"import circle (each imports the next): {circle}") from None
    assert "hub.bootstrap" in order


# --- who builds connections -----------------------------------------------------------------

NATS, POSTGRES, REDIS, KAFKA, EVENT_LOG, VIEW = (
    "NATS connection", "PostgreSQL connection", "Redis client", "Kafka client",
    "event log", "view",
)  # fmt: skip
CONNECTIONS = frozenset({NATS, POSTGRES, REDIS, KAFKA})
EVERYTHING = CONNECTIONS | {EVENT_LOG, VIEW}

_EXACT = {
    "nats.connect": NATS,
    "nats.aio.client.Client": NATS,
    "hub.natsconn.connect": NATS,
    "hub.natsconn.HubClient": NATS,
    "asyncpg.connect": POSTGRES,
    "asyncpg.create_pool": POSTGRES,
    "asyncpg.connection.connect": POSTGRES,
    "asyncpg.pool.create_pool": POSTGRES,
    "hub.eventlog.jetstream.JetStreamEventLog": EVENT_LOG,
    "hub.eventlog.kafka.KafkaEventLog": EVENT_LOG,
    "hub.eventlog.memory.MemoryEventLog": EVENT_LOG,
    "projections.postgres.PostgresRegistryProjection": VIEW,
    "projections.redis.RedisRegistryProjection": VIEW,
}
_REDIS_PARTS = {"Redis", "StrictRedis", "from_url", "from_pool", "ConnectionPool",
                "BlockingConnectionPool"}  # fmt: skip
_KAFKA_PARTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient"}

# Path (a file, or a folder ending in "/") -> what it may build besides bootstrap; see the
# module's docstring for why.
ALLOWED: dict[str, frozenset[str]] = {
    "hub/bootstrap.py": EVERYTHING,
    "hub/natsconn.py": frozenset({NATS}),
    "hub/eventlog/kafka.py": frozenset({KAFKA}),
    "hub/infra/checkers.py": CONNECTIONS,
    "hub/stack/": CONNECTIONS,
    "bench/": frozenset({NATS}),
}
SCANNED = ("hub", "bench")


def constructor_kind(qualified: str) -> str | None:
    """What a call of ``qualified`` (a dotted name, imports resolved) builds, if anything."""
    if qualified in _EXACT:
        return _EXACT[qualified]
    parts = set(qualified.split("."))
    if qualified.startswith("redis.") and parts & _REDIS_PARTS:
        return REDIS
    if qualified.startswith("aiokafka.") and parts & _KAFKA_PARTS:
        return KAFKA
    return None


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (head := _dotted(node.value)) is not None:
        return f"{head}.{node.attr}"
    return None


@dataclass(frozen=True)
class Construction:
    path: str  # relative to the root, with "/"
    line: int
    name: str  # the dotted name, imports resolved
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.name} ({self.kind})"


def constructions(path: Path, root: Path = ROOT) -> list[Construction]:
    """Every call of a constructor in the file, and every class derived from one."""
    rel = path.relative_to(root)
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    module = ".".join(parts[:-1] if is_package else parts)
    tree = ast.parse(path.read_text(), str(path))
    names = dict(imported_names(module, is_package, tree))

    def qualified(node: ast.expr) -> str | None:
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head not in names:
            return None  # a local name, not something imported
        return names[head] + ("." + rest if rest else "")

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            targets = [node.func]
        elif isinstance(node, ast.ClassDef):
            targets = node.bases
        else:
            continue
        for target in targets:
            name = qualified(target)
            if name is not None and (kind := constructor_kind(name)) is not None:
                found.append(Construction(rel.as_posix(), node.lineno, name, kind))
    return found


def allowed(path: str) -> frozenset[str]:
    return frozenset().union(
        *(kinds for where, kinds in ALLOWED.items()
          if path == where or (where.endswith("/") and path.startswith(where)))
    )  # fmt: skip


def scanned_constructions(root: Path = ROOT) -> list[Construction]:
    return [c for top in SCANNED for path in sorted((root / top).rglob("*.py"))
            for c in constructions(path, root)]  # fmt: skip


def test_the_scan_finds_constructors_however_they_are_imported() -> None:
    """The scan is not blind: it finds the constructors where they are known to be
    (a module alias, a name imported from a module, a subclass, a classmethod)."""
    found = {(c.path, c.name) for c in scanned_constructions()}
    for expected in [
        ("hub/bootstrap.py", "asyncpg.create_pool"),  # import asyncpg
        ("hub/bootstrap.py", "redis.asyncio.Redis"),  # import redis.asyncio as aioredis
        ("hub/bootstrap.py", "redis.asyncio.Redis.from_pool"),
        ("hub/bootstrap.py", "redis.asyncio.connection.BlockingConnectionPool"),  # subclassed
        ("hub/bootstrap.py", "hub.natsconn.connect"),  # from hub import natsconn
        ("hub/bootstrap.py", "hub.eventlog.kafka.KafkaEventLog"),
        ("hub/bootstrap.py", "projections.postgres.PostgresRegistryProjection"),
        ("hub/natsconn.py", "nats.aio.client.Client"),  # class HubClient(Client)
        ("hub/eventlog/kafka.py", "aiokafka.AIOKafkaProducer"),
        ("hub/infra/checkers.py", "asyncpg.connect"),
    ]:
        assert expected in found, expected


def test_only_bootstrap_builds_connections_the_event_log_and_the_views() -> None:
    """Within hub/ and bench/, connections, the event log and the views are built in
    hub/bootstrap.py, and elsewhere only where ``ALLOWED`` says (see the docstring)."""
    stray = [c for c in scanned_constructions() if c.kind not in allowed(c.path)]
    assert not stray, "built outside hub/bootstrap.py (use it, or see ALLOWED):\n" + "\n".join(
        map(str, stray)
    )
