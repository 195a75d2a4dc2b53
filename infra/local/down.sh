#!/usr/bin/env bash
# Stop what infra/local/up.sh started in RUN_DIR, then check that nothing listens on its ports any more.
#
# Usage: infra/local/down.sh RUN_DIR
#
# Only processes of this RUN_DIR are signalled: up.sh puts AUTOLABEL_SERVICE_RUN_DIR=RUN_DIR in the environment
# of every service it starts (children inherit it), and this script signals the processes carrying exactly that
# value: the servers, their worker children, and anything started the same way (see infra/README.md). Signals go
# SIGINT (Prefect workers and uvicorn shut down cleanly on it; a worker ignores SIGTERM for a long time), then
# SIGTERM, then SIGKILL. PostgreSQL is stopped with `pg_ctl stop -m fast` as the cluster's owner.
# Safe to call twice. Exit codes: 0 stopped and no listener left; 1 something still listens or survived; 2 usage.
# Environment: AUTOLABEL_STOP_GRACE (seconds to wait after SIGINT, default 20).
set -euo pipefail

[ $# -eq 1 ] || { echo "usage: $0 RUN_DIR" >&2; exit 2; }
RUN_DIR=$(realpath -m "$1")
if [ ! -d "$RUN_DIR" ]; then
  echo "down.sh: $RUN_DIR does not exist: nothing to stop"
  exit 0
fi
MARKER="AUTOLABEL_SERVICE_RUN_DIR=$RUN_DIR"
t0=$SECONDS

# this script and its callers are never signalled, even if they carry the marker
declare -A SPARE=()
p=$$
while [ -n "$p" ] && [ "$p" -gt 1 ]; do
  SPARE[$p]=1
  stat=$(cat "/proc/$p/stat" 2>/dev/null) || break
  stat=${stat##*) }
  read -r _ p _ <<<"$stat" # state, ppid
done

marked() {
  local f pid
  for f in $(grep -lzxF -- "$MARKER" /proc/[0-9]*/environ 2>/dev/null || true); do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [ -n "${SPARE[$pid]:-}" ] || echo "$pid"
  done
}

# --- the services' process groups (and whatever else carries the marker) ----------------------------------------
grace=${AUTOLABEL_STOP_GRACE:-20}
for step in "INT $grace" "TERM 10" "KILL 5"; do
  read -r sig wait_s <<<"$step"
  pids=$(marked)
  [ -n "$pids" ] || break
  echo "down.sh: SIG$sig to $(echo $pids | wc -w) process(es)"
  # shellcheck disable=SC2086
  kill -s "$sig" $pids 2>/dev/null || true
  end=$((SECONDS + wait_s))
  while [ -n "$(marked)" ] && [ $SECONDS -lt $end ]; do sleep 0.3; done
done

# --- PostgreSQL ------------------------------------------------------------------------------------------------
DATA=$RUN_DIR/pg/data
if [ -f "$DATA/postmaster.pid" ]; then
  PG_BIN=${AUTOLABEL_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  owner=$(stat -c %U "$DATA")
  as_pg=()
  [ "$(id -u)" -eq 0 ] && [ "$owner" != root ] && as_pg=(runuser -u "$owner" --)
  pmpid=$(head -n 1 "$DATA/postmaster.pid")
  echo "down.sh: pg_ctl stop -m fast"
  if ! "${as_pg[@]}" "$PG_BIN/pg_ctl" -D "$DATA" stop -m fast -w -t 30 >/dev/null 2>&1; then
    # only the postmaster of this data folder (its command line names it)
    if [ -r "/proc/$pmpid/cmdline" ] && tr '\0' ' ' <"/proc/$pmpid/cmdline" | grep -qF -- "$DATA"; then
      echo "down.sh: pg_ctl stop failed; SIGQUIT then SIGKILL to the postmaster $pmpid" >&2
      kill -QUIT "$pmpid" 2>/dev/null || true
      sleep 3
      kill -KILL "$pmpid" 2>/dev/null || true
      sleep 1
    fi
  fi
fi

# shellcheck source=procs.sh
source "$(cd "$(dirname "$0")" && pwd)/procs.sh" # alive PID, listening PORT

# --- pid files of what is gone ----------------------------------------------------------------------------------
for f in "$RUN_DIR"/pids/*.pid; do
  [ -e "$f" ] || continue
  pid=$(head -n 1 "$f")
  alive "$pid" || rm -f "$f"
done

# --- verify ----------------------------------------------------------------------------------------------------
status=0
left=$(marked)
if [ -n "$left" ]; then
  echo "down.sh: still running after SIGKILL: $left" >&2
  status=1
fi
if [ -f "$RUN_DIR/ports.env" ]; then
  while IFS='=' read -r name port; do
    [ -n "$port" ] || continue
    if listening "$port"; then
      echo "down.sh: something still listens on port $port ($name)" >&2
      command -v ss >/dev/null && { ss -Hltnp "sport = :$port" >&2 || true; }
      status=1
    fi
  done <"$RUN_DIR/ports.env"
fi
[ $status -eq 0 ] && echo "down.sh: stopped $RUN_DIR in $((SECONDS - t0)) s; no listener left"
exit $status
