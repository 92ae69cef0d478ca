#!/usr/bin/env bash
# Runs every test: the behaviour suite on the memory store and on a real PostgreSQL, the
# PostgreSQL store's own tests, the examples' tests and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure-postgres.sh
cargo test --workspace --all-features "$@"
