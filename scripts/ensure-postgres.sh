#!/usr/bin/env bash
# Makes sure the tests have a PostgreSQL server, in the order the test harness looks for one:
#   1. TEST_DATABASE_URL, if set, is used as it is;
#   2. a server answering at 127.0.0.1:5432 (user postgres, trust auth);
#   3. an installed Debian cluster that is stopped: started;
#   4. nothing installed and we are root: Debian's postgresql package is installed, started,
#      and given trust auth for user postgres on 127.0.0.1.
# Without root and without a server it says what to install and fails.
set -euo pipefail

if [ -n "${TEST_DATABASE_URL:-}" ]; then
  echo "ensure-postgres: using TEST_DATABASE_URL"
  exit 0
fi

answers() {
  if command -v pg_isready >/dev/null 2>&1; then
    pg_isready -q -h 127.0.0.1 -p 5432 -U postgres
  else
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null
  fi
}

wait_ready() {
  for _ in $(seq 1 60); do
    answers && return 0
    sleep 1
  done
  return 1
}

if answers; then
  echo "ensure-postgres: a server answers at 127.0.0.1:5432"
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"; else return 1; fi; }

start_clusters() {
  local started=1
  for v in $(ls /etc/postgresql 2>/dev/null); do
    as_root pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null && started=0 || true
  done
  return $started
}

if ls /etc/postgresql/*/main >/dev/null 2>&1; then
  echo "ensure-postgres: starting the installed cluster"
  start_clusters || true
  if wait_ready; then exit 0; fi
fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if as_root true 2>/dev/null && command -v apt-get >/dev/null 2>&1; then
    echo "ensure-postgres: installing Debian's postgresql package"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "ensure-postgres: no PostgreSQL server and no way to install one." >&2
    echo "  Install it (Debian: sudo apt-get install postgresql), or set TEST_DATABASE_URL." >&2
    exit 1
  fi
fi

if ls /etc/postgresql/*/main >/dev/null 2>&1; then
  # Trust auth for user postgres over TCP on loopback only: test machines, never production.
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    if ! as_root grep -q "taskhistory-tests" "$hba"; then
      as_root sed -i '1i host all postgres 127.0.0.1/32 trust # taskhistory-tests' "$hba"
    fi
  done
  start_clusters || true
  for v in $(ls /etc/postgresql); do as_root pg_ctlcluster --skip-systemctl-redirect "$v" main reload 2>/dev/null || true; done
  if wait_ready; then
    echo "ensure-postgres: server ready at 127.0.0.1:5432"
    exit 0
  fi
fi

# Binaries but no running cluster: the test harness starts a throwaway server from them.
echo "ensure-postgres: no server answers; the tests will start a throwaway one from $(ls -d /usr/lib/postgresql/*/bin | tail -n1)"
