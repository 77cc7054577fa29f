# Everything a fresh machine needs, from what the project installs itself:
# a bootstrap venv with a pinned uv, the locked project venv (embedded servers
# included), and the Kafka broker jars from Maven Central. Downloads are cached
# under .cache/ (ignored by git).

PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .cache/bootstrap/bin/uv
export UV_CACHE_DIR := $(CURDIR)/.cache/uv
export UV_PYTHON_DOWNLOADS := never
KAFKA_LIBS := .cache/kafka/libs

.PHONY: dev test setup kafka-jars lint bench-clean

dev: .venv/.synced
	.venv/bin/hub dev

test: .venv/.synced kafka-jars
	.venv/bin/pytest

setup: .venv/.synced kafka-jars

lint: .venv/.synced
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy events handlers hub projections shared

$(UV):
	$(PYTHON) -m venv .cache/bootstrap
	.cache/bootstrap/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	touch $@

kafka-jars: .venv/.synced
	.venv/bin/python -c "from hub.stack import KafkaServer; print('kafka jars:', KafkaServer.ensure_jars())"
