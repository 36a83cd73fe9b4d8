#!/usr/bin/env bash
# Installs dependencies, builds, and runs every test that needs no GPU: the C++ suites (CTest
# labels cpu and e2e), then the Python client's tests against the real server binary and the
# offline checks of deploy/ (Kubernetes schemas, alert rules, dashboard); the fuzz targets briefly;
# the docs checker (scripts/check_docs.py) first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
python3 scripts/check_docs.py   # every path and flag README.md and docs/ name exists
scripts/build.sh
ctest --test-dir build -LE gpu --output-on-failure -j"$(nproc)"
scripts/fuzz.sh 20   # libFuzzer smoke: the seed corpus and 20 s of mutation per target (ASan + UBSan)
scripts/python-env.sh --gemma
KVCOMPACT_SERVER_BINARY="$PWD/build/server/kvcompact-server" build/pyenv/bin/python -m pytest -q client/python/tests deploy/tests tests/scripts
