#!/usr/bin/env bash
# Installs the servers the integration tests start (Debian's redis-server and PostgreSQL).
# The tests start and stop their own instances on free loopback ports; nothing is left running.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing ${need[*]}: run as root or install them with apt-get" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# Debian's packages start system services; the tests use their own instances.
service redis-server stop >/dev/null 2>&1 || true
echo "services: redis-server $(redis-server --version | awk '{print $3}'), postgresql $(ls /usr/lib/postgresql/)"
