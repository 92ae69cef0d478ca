#!/usr/bin/env bash
# Runs every test: the behaviour suite on the memory store and on a real PostgreSQL, the
# PostgreSQL store's own tests, the examples' tests and the doc tests; then prints one
# closing line with the totals.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
bash scripts/ensure-pgbouncer.sh
# The rolling-migration tests drive the Python service's statements through asyncpg.
if ! python3 -c 'import asyncpg' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check asyncpg 2>/dev/null \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages asyncpg
fi
# The dashboard's browser test drives Debian's Chromium through ChromeDriver.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
  else
    echo "test.sh: no chromium/chromedriver (as root: apt-get install chromium chromium-driver)" >&2
  fi
fi
# The translated-messages test starts its own server speaking German: it needs the locale.
if ! locale -a 2>/dev/null | grep -qix 'de_DE\.utf-\?8'; then
  if [ "$(id -u)" = 0 ]; then
    command -v localedef >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq locales >/dev/null; }
    localedef -i de_DE -f UTF-8 de_DE.UTF-8
  else
    echo "test.sh: no de_DE.UTF-8 locale (as root: localedef -i de_DE -f UTF-8 de_DE.UTF-8)" >&2
  fi
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-features --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
echo
awk '/^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
