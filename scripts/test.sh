#!/usr/bin/env bash
# The whole test suite, as CI runs it: set up the host, lint, type-check, test.
# Real components are required here (IMAGEPIPE_REQUIRE_REAL=1): a test that cannot reach
# Packer, libvirt/QEMU or HAProxy fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

./install.sh --dev
export IMAGEPIPE_REQUIRE_REAL="${IMAGEPIPE_REQUIRE_REAL:-1}"

echo "== ruff check";        .venv/bin/ruff check imagepipe tests benchmarks
echo "== ruff format";       .venv/bin/ruff format --check imagepipe tests benchmarks
echo "== mypy";              .venv/bin/mypy
echo "== pytest";            .venv/bin/python -m pytest -q "$@"
