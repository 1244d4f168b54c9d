#!/usr/bin/env bash
# Builds the web pages (big screen, console) from web/ into crates/sluice-server/web-dist, which
# is committed and embedded into the sluice binary (so cargo alone builds Sluice, without Node).
#   bash web/build.sh          rebuild the committed bundle after changing web/
#   bash web/build.sh --check  fail if the committed bundle is not what web/ builds (CI runs it)
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
npx tsc --noEmit
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  npx vite build --logLevel error --outDir "$out" --emptyOutDir
  if ! diff -r "$out" ../crates/sluice-server/web-dist; then
    echo "crates/sluice-server/web-dist is not what web/ builds: run bash web/build.sh and commit it" >&2
    exit 1
  fi
  echo "web bundle: up to date"
else
  npx vite build --logLevel error
fi
