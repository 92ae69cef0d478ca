#!/usr/bin/env bash
# Makes sure Debian's pgbouncer package is installed: the PgBouncer tests start their own
# instance from it (transaction pooling, a port of their own). Without root and without the
# package it says what to install and fails.
set -euo pipefail
for bin in /usr/sbin/pgbouncer /usr/bin/pgbouncer; do
  if [ -x "$bin" ]; then exit 0; fi
done
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi; }
if as_root true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
  echo "ensure-pgbouncer: installing Debian's pgbouncer package"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null 2>&1 || {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
  }
  # The package starts a system instance; the tests start their own.
  as_root systemctl stop pgbouncer >/dev/null 2>&1 || as_root service pgbouncer stop >/dev/null 2>&1 || true
  exit 0
fi
echo "ensure-pgbouncer: pgbouncer is missing. Install it (Debian: sudo apt-get install pgbouncer)." >&2
exit 1
