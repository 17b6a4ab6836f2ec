#!/usr/bin/env bash
# Set up imagepipe on this host: system packages and daemons (scripts/setup-host.sh), then a
# virtual environment in .venv with imagepipe and its extras (libvirt, VirtualBox, web, PostgreSQL).
#   ./install.sh              runtime
#   ./install.sh --dev        plus the test and lint tools
#   ./install.sh --service    plus the keeper as a systemd service: system user `imagepipe`
#                             (in the libvirt group when there is one), /etc/imagepipe with a
#                             sample settings file, /var/lib/imagepipe, the unit
#                             imagepipe-keep.service; enable it with
#                             `systemctl enable --now imagepipe-keep`
#   ./install.sh --service --root DIR
#                             only the service's files, user and unit, under DIR instead of /
#                             (packaging, tests); no host setup, no venv
# Idempotent: a second run changes nothing, and never overwrites an edited /etc/imagepipe file.
# Debian 12, as root.
set -euo pipefail
cd "$(dirname "$0")"

extras="libvirt,virtualbox,web,postgresql"
service=no
root=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="$extras,dev" ;;
    --service) service=yes ;;
    --root) root="${2:?--root needs a folder}"; shift ;;
    *) echo "install: unknown option $1 (--dev, --service, --root DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$root" ] && [ "$service" != yes ]; then
  echo "install: --root only goes with --service" >&2
  exit 2
fi

install_service() {
  # $1: the root to install into ("" = /). $IMAGEPIPE_BIN: the imagepipe the unit runs.
  local r="$1" bin="${IMAGEPIPE_BIN:-$(pwd)/.venv/bin/imagepipe}"
  local useradd_root=()
  [ -n "$r" ] && useradd_root=(--root "$r")
  if ! grep -q '^imagepipe:' "$r/etc/passwd" 2>/dev/null; then
    useradd "${useradd_root[@]}" --system --user-group --home-dir /var/lib/imagepipe \
      --no-create-home --shell /usr/sbin/nologin --comment "imagepipe pool keeper" imagepipe
  fi
  # qemu:///system lets the libvirt group in (Debian's libvirt-daemon-system).
  if grep -q '^libvirt:' "$r/etc/group" && ! grep -q '^libvirt:.*[:,]imagepipe\(,\|$\)' "$r/etc/group"; then
    usermod "${useradd_root[@]}" --append --groups libvirt imagepipe
  fi
  install -d -m 0755 "$r/etc/imagepipe"
  install -d -m 0755 "$r/etc/imagepipe/pools"
  install -d -m 0700 "$r/var/lib/imagepipe"
  chroot_owner="$(awk -F: '$1 == "imagepipe" {print $3 ":" $4}' "$r/etc/passwd")"
  chown "$chroot_owner" "$r/var/lib/imagepipe"
  if [ ! -e "$r/etc/imagepipe/imagepipe.yml" ]; then
    cat > "$r/etc/imagepipe/imagepipe.yml" <<'YAML'
# imagepipe settings for the keeper service (every key and its default: README.md,
# "Configuration"; imagepipe.example.yml in the checkout). After a change:
#   imagepipe --config /etc/imagepipe/imagepipe.yml pools check && systemctl reload imagepipe-keep
pools_dir: /etc/imagepipe/pools
state_db: /var/lib/imagepipe/state.db
registry: /var/lib/imagepipe/registry
image_store: /var/lib/imagepipe/images
run_dir: /run/imagepipe
hypervisor:
  driver: libvirt
  uri: qemu:///system
balancer:
  driver: haproxy
  bind: 127.0.0.1:5999
keeper:
  tick: 5s
  # Prometheus metrics on loopback; remove to turn them off
  metrics: 127.0.0.1:9464
YAML
  fi
  if [ ! -e "$r/etc/imagepipe/pools/example.yml.sample" ]; then
    cat > "$r/etc/imagepipe/pools/example.yml.sample" <<'YAML'
# A pool: copy to <name>.yml (only *.yml / *.yaml files are pools), edit, check, reload:
#   imagepipe --config /etc/imagepipe/imagepipe.yml pools check && systemctl reload imagepipe-keep
name: lab
image: tiny
channel: latest
size: {initial: 2, free: 2, max: 4}
display: {port_range: 5900-5903}
sessions: {recycle_after: 1m}
YAML
  fi
  install -d -m 0755 "$r/etc/systemd/system"
  local unit
  for unit in imagepipe-keep.service imagepipe-web.service; do
    sed -e "s#/opt/imagepipe/.venv/bin/imagepipe#$bin#" -e "s#/opt/imagepipe#$(pwd)#g" \
      "imagepipe/data/$unit" > "$r/etc/systemd/system/$unit.new"
    if cmp -s "$r/etc/systemd/system/$unit.new" "$r/etc/systemd/system/$unit"; then
      rm "$r/etc/systemd/system/$unit.new"
    else
      chmod 0644 "$r/etc/systemd/system/$unit.new"
      mv "$r/etc/systemd/system/$unit.new" "$r/etc/systemd/system/$unit"
      if [ -z "$r" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
      fi
    fi
  done
  echo "install: services imagepipe-keep and imagepipe-web installed${r:+ under $r} (user imagepipe, /etc/imagepipe);" \
    "start it with: systemctl enable --now imagepipe-keep"
}

if [ -n "$root" ]; then
  install_service "$root"
  exit 0
fi

if [[ ",$extras," == *,dev,* ]]; then
  ./scripts/setup-host.sh --dev
else
  ./scripts/setup-host.sh
fi

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
[ "$service" = yes ] && install_service ""
exit 0
