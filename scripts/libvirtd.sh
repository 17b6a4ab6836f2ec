#!/usr/bin/env bash
# Start (or restart) libvirtd on a host where systemd does not run it, as in a container or a
# CI machine whose PID 1 is not an init system. Debian 12, as root.
#
#   scripts/libvirtd.sh start      start virtlogd and libvirtd unless libvirtd already answers
#   scripts/libvirtd.sh restart    stop the libvirtd this script started, start it again
#   scripts/libvirtd.sh stop       stop the libvirtd this script started (running guests keep
#                                  running; tests/e2e/test_libvirtd_restart.py keeps it down a
#                                  while under a keeper)
#
# Why tini: QEMU daemonizes, so each guest's QEMU is an orphan, and libvirt's destroy returns
# only once that orphan is reaped. systemd reaps at once; a PID 1 that is not an init system may
# take seconds (2 s on the machine this was measured on), and every desktop reset paid it.
# libvirtd runs under `tini -s`, a child subreaper: orphaned QEMUs are re-parented to tini,
# which reaps them at once, as systemd would.
set -euo pipefail

uri=qemu:///system
pidfile=/run/imagepipe-libvirtd-tini.pid
log=/var/log/libvirt/libvirtd-imagepipe.log

answers() { virsh -c "$uri" version >/dev/null 2>&1; }

wait_for() {  # wait_for up|down
  for _ in $(seq 1 100); do
    if [ "$1" = up ] && answers; then return 0; fi
    if [ "$1" = down ] && ! pgrep -x libvirtd >/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "libvirtd.sh: libvirtd did not come $1 within 10 s (log: $log)" >&2
  return 3
}

start() {
  answers && return 0
  mkdir -p /var/log/libvirt /run/libvirt
  pgrep -x virtlogd >/dev/null || virtlogd -d
  if ! pgrep -x libvirtd >/dev/null; then
    setsid tini -s -- libvirtd >>"$log" 2>&1 < /dev/null &
    echo $! > "$pidfile"
  fi
  wait_for up
}

stop() {
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    # tini forwards SIGTERM to libvirtd; running guests keep running (their QEMUs are tini's)
    pkill -TERM -x libvirtd || true
  else
    echo "libvirtd.sh: libvirtd was not started by this script; not stopping it" >&2
    return 3
  fi
  wait_for down
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: scripts/libvirtd.sh start|stop|restart" >&2; exit 2 ;;
esac
