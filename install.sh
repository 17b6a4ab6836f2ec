#!/usr/bin/env bash
# Set up imagepipe on this host: system packages and daemons (scripts/setup-host.sh), then a
# virtual environment in .venv with imagepipe and its libvirt and VirtualBox extras.
#   ./install.sh          runtime
#   ./install.sh --dev    plus the test and lint tools
# Idempotent. Debian 12, as root.
set -euo pipefail
cd "$(dirname "$0")"

extras="libvirt,virtualbox"
[ "${1:-}" = "--dev" ] && extras="$extras,dev"

./scripts/setup-host.sh

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.imagepipe-installed-$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e ".[$extras]"; } > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install: pip failed; full output in $(pwd)/$log" >&2
    exit 3
  fi
  touch "$stamp"
fi
# `imagepipe` on PATH for administrators, with bash completion.
ln -sf "$(pwd)/.venv/bin/imagepipe" /usr/local/bin/imagepipe
if [ -d /etc/bash_completion.d ] || mkdir -p /etc/bash_completion.d; then
  cp completions/imagepipe.bash /etc/bash_completion.d/imagepipe
fi
echo "install: imagepipe $(.venv/bin/imagepipe --version | cut -d' ' -f2) in $(pwd)/.venv (extras: $extras)"
