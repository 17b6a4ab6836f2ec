#!/bin/sh
# The director's command agent, on a serial port (argument: the device).
# Request, one line:   ID CMD_B64 [STDIN_B64]
#   CMD_B64 is a shell command line in base64 (the host quotes every argument).
# Reply:               @@OUT ID, the command's stdout in base64, @@ERR ID, its stderr in
#                      base64, @@END ID EXIT_CODE. A line that does not decode is answered
#                      with exit code 125. Commands run one at a time, as root, with LANG=C.
dev=${1:-/dev/ttyS1}
stty -F "$dev" raw -echo -icrnl -opost 2>/dev/null
exec <"$dev" >"$dev"
export LANG=C LC_ALL=C PATH=/bin:/sbin
echo "@@READY"
while read -r id cmd input; do
  [ -n "$id" ] || continue
  if printf '%s' "$cmd" | base64 -d >/tmp/agent.cmd 2>/dev/null \
    && printf '%s' "$input" | base64 -d >/tmp/agent.in 2>/dev/null; then
    sh /tmp/agent.cmd </tmp/agent.in >/tmp/agent.out 2>/tmp/agent.err
    rc=$?
  else
    : >/tmp/agent.out
    echo "agent: request $id does not decode" >/tmp/agent.err
    rc=125
  fi
  echo "@@OUT $id"
  base64 </tmp/agent.out
  echo "@@ERR $id"
  base64 </tmp/agent.err
  echo "@@END $id $rc"
done
