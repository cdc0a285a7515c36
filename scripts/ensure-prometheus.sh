#!/usr/bin/env bash
# Make sure promtool and prometheus are available for the deploy-file tests (promtool check
# config / check rules / test rules / check metrics, and a live Prometheus scraping two
# consumers): the ones on PATH, else Debian's prometheus package (as root). Without them the
# tests that need them fail, saying so.
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "promtool or prometheus not found: installing Debian's prometheus package" >&2
  apt-get update -qq
  # the package's own service is not wanted here (tests start their own, on free ports)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  exit 0
fi
echo "promtool or prometheus not found and not installable here (needs apt-get as root)" >&2
exit 1
