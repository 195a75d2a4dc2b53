#!/usr/bin/env bash
# Start the real services of the pipeline on 127.0.0.1, without Docker:
#   PostgreSQL (databases `prefect` and `mlflow`), S3 (moto via s3_server.py, which keeps credentials out of its
#   log; buckets `mlflow-artifacts`, `dvc-remote`),
#   a Prefect server on PostgreSQL (scheduler on) and an MLflow server on PostgreSQL + S3 (proxied artifacts).
#
# Usage: infra/local/up.sh RUN_DIR      then: source RUN_DIR/env.sh     stop: infra/local/down.sh RUN_DIR
#
# Everything lives in RUN_DIR: pg/ (data, owned by `postgres` when run as root), logs/*.log, pids/*.pid,
# ports.env (ports, no secrets) and env.sh (mode 600: URLs and the generated credentials). Secrets are
# generated here, handed to the servers through their environment (never argv) and never printed.
#
# Environment (all optional):
#   AUTOLABEL_VENV          venv holding prefect, mlflow, moto_server (default: the checkout's .venv)
#   AUTOLABEL_PG_BIN        PostgreSQL binaries (default: newest /usr/lib/postgresql/*/bin)
#   AUTOLABEL_SERVICES      subset to start, in this order: "postgres s3 prefect mlflow" (the default)
#   AUTOLABEL_{PG,S3,PREFECT,MLFLOW}_PORT   fixed ports (default: free ports chosen now)
#   AUTOLABEL_{PG,S3,PREFECT,MLFLOW}_TIMEOUT health wait in seconds (default 30, 30, 150, 180)
# Exit codes: 0 all healthy; 2 usage/prerequisites; 3 RUN_DIR already in use; 1 a service failed to start
# (the tail of its log is printed and everything started so far is stopped).
set -euo pipefail
umask 077

die() { echo "up.sh: $*" >&2; exit 2; }
log() { echo "up.sh: $*"; }

[ $# -eq 1 ] || die "usage: $0 RUN_DIR"
HERE=$(cd "$(dirname "$0")" && pwd)
RUN_DIR=$(realpath -m "$1")
VENV=$(cd "${AUTOLABEL_VENV:-$HERE/../../.venv}" 2>/dev/null && pwd) || die "no venv at ${AUTOLABEL_VENV:-$HERE/../../.venv}"
BIN=$VENV/bin
PY=$BIN/python
SERVICES=" ${AUTOLABEL_SERVICES:-postgres s3 prefect mlflow} "
want() { [[ $SERVICES == *" $1 "* ]]; }

for s in $SERVICES; do
  case $s in postgres | s3 | prefect | mlflow) ;; *) die "unknown service '$s' in AUTOLABEL_SERVICES" ;; esac
done
if want prefect || want mlflow; then want postgres || die "prefect and mlflow need postgres in AUTOLABEL_SERVICES"; fi
if want mlflow; then want s3 || die "mlflow needs s3 in AUTOLABEL_SERVICES"; fi
[ -x "$PY" ] || die "$PY not found (set AUTOLABEL_VENV)"
for tool in setsid realpath; do command -v "$tool" >/dev/null || die "'$tool' is not installed"; done
want s3 && { [ -x "$BIN/moto_server" ] || die "$BIN/moto_server missing: install the 'services' extra (moto[server])"; }
want prefect && { [ -x "$BIN/prefect" ] || die "$BIN/prefect missing"; }
want mlflow && { [ -x "$BIN/mlflow" ] || die "$BIN/mlflow missing"; }
if want postgres; then
  PG_BIN=${AUTOLABEL_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
  [ -n "$PG_BIN" ] && [ -x "$PG_BIN/initdb" ] ||
    die "PostgreSQL binaries not found (apt-get install -y postgresql, or set AUTOLABEL_PG_BIN)"
  # initdb refuses root: when root, the cluster belongs to the `postgres` user
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user to own the cluster"
    PG_OWNER=postgres
    AS_PG=(runuser -u postgres --)
  else
    PG_OWNER=$(id -un)
    AS_PG=()
  fi
  # unix socket paths are limited to 107 bytes
  [ ${#RUN_DIR} -le 80 ] || die "RUN_DIR path too long for a PostgreSQL socket (keep it under 80 characters)"
fi

# shellcheck source=procs.sh
source "$HERE/procs.sh" # alive PID, listening PORT

# --- refuse a RUN_DIR that is (or was) in use -------------------------------------------------------------
if [ -d "$RUN_DIR/pids" ] || [ -e "$RUN_DIR/env.sh" ] || [ -d "$RUN_DIR/pg" ]; then
  for f in "$RUN_DIR"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(head -n 1 "$f")
    if alive "$pid"; then
      echo "up.sh: $RUN_DIR already has live services ($(basename "$f" .pid) pid $pid); stop them with down.sh" >&2
      exit 3
    fi
  done
  echo "up.sh: $RUN_DIR holds a stopped instance; remove it or choose another RUN_DIR" >&2
  exit 3
fi

mkdir -p "$RUN_DIR"
LOGS=$RUN_DIR/logs
PIDS=$RUN_DIR/pids
mkdir -p "$LOGS" "$PIDS"
chmod 711 "$RUN_DIR" "$LOGS" # traversable (not listable) by the postgres user
MARKER="AUTOLABEL_SERVICE_RUN_DIR=$RUN_DIR"

# --- process handling -----------------------------------------------------------------------------------------
STARTED_OK=0
cleanup() {
  local rc=$?
  if [ "$STARTED_OK" -ne 1 ]; then
    echo "up.sh: stopping what was started" >&2
    "$HERE/down.sh" "$RUN_DIR" >&2 || true
    rm -f "$RUN_DIR/env.sh"
    [ "$rc" -ne 0 ] || rc=1
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# four distinct free ports, chosen while all four sockets are held; AUTOLABEL_*_PORT overrides
read -r p1 p2 p3 p4 < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
PG_PORT=${AUTOLABEL_PG_PORT:-$p1}
S3_PORT=${AUTOLABEL_S3_PORT:-$p2}
PREFECT_PORT=${AUTOLABEL_PREFECT_PORT:-$p3}
MLFLOW_PORT=${AUTOLABEL_MLFLOW_PORT:-$p4}
ports=()
want postgres && ports+=("PG_PORT=$PG_PORT")
want s3 && ports+=("S3_PORT=$S3_PORT")
want prefect && ports+=("PREFECT_PORT=$PREFECT_PORT")
want mlflow && ports+=("MLFLOW_PORT=$MLFLOW_PORT")
for kv in "${ports[@]}"; do
  port=${kv#*=}
  if listening "$port"; then die "port $port (${kv%%=*}) is already in use"; fi
done
# ports.env: what down.sh checks; no secrets in it
printf '%s\n' "${ports[@]}" >"$RUN_DIR/ports.env"
chmod 644 "$RUN_DIR/ports.env"

# --- secrets (generated, never printed) -----------------------------------------------------------------------
PG_USER=autolabel
{
  read -r PG_PASSWORD
  read -r AWS_KEY_ID
  read -r AWS_SECRET
} < <("$PY" -c '
import secrets, string
print(secrets.token_urlsafe(24))
print("AKIA" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)))
print(secrets.token_urlsafe(30))
')
REGION=us-east-1

# start NAME VAR=VALUE... -- CMD...: CMD in its own session (process group), a clean environment (no PREFECT_*,
# MLFLOW_*, AWS_* inherited, e.g. from a test session in embedded mode) plus the given variables and the marker
# that down.sh uses to recognise the processes of this RUN_DIR; values go through the environment, never argv.
start() {
  local name=$1
  shift
  (
    while IFS= read -r var; do
      case $var in PREFECT_* | MLFLOW_* | AWS_* | PG* | DVC_* | BOTO* | AUTOLABEL_*) unset "$var" ;; esac
    done < <(compgen -e)
    while [ "$1" != "--" ]; do export "${1?}"; shift; done
    shift
    export "$MARKER" PATH="$BIN:$PATH" PYTHONUNBUFFERED=1 DO_NOT_TRACK=1
    # loopback never through a proxy (MLflow's boto3 → moto, the health checks)
    export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
    exec setsid "$@"
  ) >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo "$!" >"$PIDS/$name.pid"
}

fail_service() {
  local name=$1 why=$2
  echo "up.sh: $name failed: $why" >&2
  echo "----- last lines of $LOGS/$name.log -----" >&2
  tail -n 40 "$LOGS/$name.log" >&2 || true
  echo "-----" >&2
  exit 1
}

# wait_for NAME TIMEOUT CHECK...: poll CHECK until it succeeds; fail early when the service's process is gone
wait_for() {
  local name=$1 timeout=$2 t0=$SECONDS pid=""
  shift 2
  [ -f "$PIDS/$name.pid" ] && pid=$(head -n 1 "$PIDS/$name.pid")
  until "$@" >/dev/null 2>&1; do
    if [ -n "$pid" ] && ! alive "$pid"; then fail_service "$name" "process exited"; fi
    if [ $((SECONDS - t0)) -ge "$timeout" ]; then fail_service "$name" "not healthy after ${timeout}s"; fi
    sleep 0.5
  done
  log "$name healthy on 127.0.0.1 after $((SECONDS - t0)) s"
}

# http_body URL [EXPECTED]: a 2xx answer (whose body, stripped, is EXPECTED); python, so curl is not needed
http_body() {
  "$PY" -c '
import sys, urllib.request
with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(sys.argv[1], timeout=5) as r:
    sys.exit(len(sys.argv) > 2 and r.read().decode().strip() != sys.argv[2])
' "$@"
}

# --- S3 (moto): started first, it boots while PostgreSQL initialises --------------------------------------------
if want s3; then
  start s3 -- "$PY" "$HERE/s3_server.py" -H 127.0.0.1 -p "$S3_PORT"
fi

# --- PostgreSQL ------------------------------------------------------------------------------------------------
if want postgres; then
  PG_DIR=$RUN_DIR/pg
  PG_SOCK=$RUN_DIR/pg-sock
  mkdir -p "$PG_DIR" "$PG_SOCK"
  touch "$LOGS/postgres.log"
  chown "$PG_OWNER" "$PG_DIR" "$PG_SOCK" "$LOGS/postgres.log"
  chmod 700 "$PG_DIR" "$PG_SOCK"
  "${AS_PG[@]}" test -w "$PG_DIR" ||
    die "user $PG_OWNER cannot reach $PG_DIR (a parent folder is not traversable); use a RUN_DIR under /tmp"
  # a throwaway cluster: peer auth on the socket for the superuser, passwords (SCRAM) over TCP for everyone
  "${AS_PG[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C --no-sync \
    --auth-local=peer --auth-host=scram-sha-256 >>"$LOGS/postgres.log" 2>&1 ||
    fail_service postgres "initdb failed"
  "${AS_PG[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$LOGS/postgres.log" -w -t "${AUTOLABEL_PG_TIMEOUT:-30}" \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_SOCK" start >/dev/null ||
    fail_service postgres "pg_ctl start failed"
  head -n 1 "$PG_DIR/data/postmaster.pid" >"$PIDS/postgres.pid"
  wait_for postgres "${AUTOLABEL_PG_TIMEOUT:-30}" "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2
  # the role's password goes in as a SCRAM verifier computed here: the server never sees the password itself
  verifier=$(PW="$PG_PASSWORD" "$PY" -c '
import base64, hashlib, hmac, os
salt, n = os.urandom(16), 4096
salted = hashlib.pbkdf2_hmac("sha256", os.environ["PW"].encode(), salt, n)
stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
server = hmac.new(salted, b"Server Key", "sha256").digest()
b = lambda x: base64.b64encode(x).decode()
print(f"SCRAM-SHA-256${n}:{b(salt)}${b(stored)}:{b(server)}")
')
  "${AS_PG[@]}" "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres \
    >>"$LOGS/postgres.log" 2>&1 <<SQL || fail_service postgres "creating the role and databases failed"
CREATE ROLE $PG_USER LOGIN PASSWORD '$verifier';
CREATE DATABASE prefect OWNER $PG_USER;
CREATE DATABASE mlflow OWNER $PG_USER;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
  PG_URL_BASE="$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT"
fi

# --- S3 buckets ------------------------------------------------------------------------------------------------
if want s3; then
  S3_URL=http://127.0.0.1:$S3_PORT
  wait_for s3 "${AUTOLABEL_S3_TIMEOUT:-30}" http_body "$S3_URL/moto-api/"
  AWS_ACCESS_KEY_ID=$AWS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET S3_URL=$S3_URL "$PY" - >>"$LOGS/s3.log" 2>&1 <<'PYCODE' ||
import os
import boto3
s3 = boto3.client("s3", endpoint_url=os.environ["S3_URL"], region_name="us-east-1")
for bucket in ("mlflow-artifacts", "dvc-remote"):
    s3.create_bucket(Bucket=bucket)
print("buckets:", sorted(b["Name"] for b in s3.list_buckets()["Buckets"]))
PYCODE
    fail_service s3 "creating the buckets failed"
fi

# --- Prefect server and MLflow server (started together: both spend their first seconds in imports/migrations) ---
if want prefect; then
  mkdir -p "$RUN_DIR/prefect-home"
  start prefect \
    PREFECT_HOME="$RUN_DIR/prefect-home" \
    PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG_URL_BASE/prefect" \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_UI_ENABLED=false \
    PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY=false \
    PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS=false \
    PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED=true \
    PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=true \
    -- "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" --scheduler --late-runs --no-ui \
    --analytics-off
fi
if want mlflow; then
  # MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no huey job consumer (GenAI jobs; not used here), one process less.
  # Host validation: only 127.0.0.1/localhost on this port (the default also allows every private IP).
  start mlflow \
    MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$PG_URL_BASE/mlflow" \
    MLFLOW_S3_ENDPOINT_URL="$S3_URL" \
    AWS_ACCESS_KEY_ID="$AWS_KEY_ID" \
    AWS_SECRET_ACCESS_KEY="$AWS_SECRET" \
    AWS_DEFAULT_REGION="$REGION" \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    -- "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --artifacts-destination s3://mlflow-artifacts \
    --allowed-hosts "127.0.0.1:$MLFLOW_PORT,localhost:$MLFLOW_PORT"
fi
if want prefect; then
  wait_for prefect "${AUTOLABEL_PREFECT_TIMEOUT:-150}" http_body "http://127.0.0.1:$PREFECT_PORT/api/health" true
fi
if want mlflow; then
  wait_for mlflow "${AUTOLABEL_MLFLOW_TIMEOUT:-180}" http_body "http://127.0.0.1:$MLFLOW_PORT/health" OK
fi

# --- env.sh (mode 600) ---------------------------------------------------------------------------------------
{
  echo "# written by infra/local/up.sh on $(date -u +%FT%TZ); source it to use the services of $RUN_DIR"
  q() { printf 'export %s=%q\n' "$1" "$2"; }
  q AUTOLABEL_RUN_DIR "$RUN_DIR"
  if want postgres; then
    q AUTOLABEL_PG_HOST 127.0.0.1
    q AUTOLABEL_PG_PORT "$PG_PORT"
    q AUTOLABEL_PG_USER "$PG_USER"
    q AUTOLABEL_PG_PASSWORD "$PG_PASSWORD"
  fi
  if want s3; then
    q AUTOLABEL_S3_PORT "$S3_PORT"
    q AWS_ACCESS_KEY_ID "$AWS_KEY_ID"
    q AWS_SECRET_ACCESS_KEY "$AWS_SECRET"
    q AWS_DEFAULT_REGION "$REGION"
    q MLFLOW_S3_ENDPOINT_URL "$S3_URL"
    q AUTOLABEL_DVC_REMOTE s3://dvc-remote/autolabel
    q AUTOLABEL_DVC_ENDPOINT "$S3_URL"
    q AWS_ENDPOINT_URL_S3 "$S3_URL"   # boto3/s3fs (the DVC remote) find the S3 endpoint here
  fi
  if want prefect; then
    q AUTOLABEL_PREFECT_PORT "$PREFECT_PORT"
    q PREFECT_API_URL "http://127.0.0.1:$PREFECT_PORT/api"
  fi
  if want mlflow; then
    q AUTOLABEL_MLFLOW_PORT "$MLFLOW_PORT"
    q MLFLOW_TRACKING_URI "http://127.0.0.1:$MLFLOW_PORT"
  fi
} >"$RUN_DIR/env.sh.tmp"
chmod 600 "$RUN_DIR/env.sh.tmp"
mv "$RUN_DIR/env.sh.tmp" "$RUN_DIR/env.sh"
STARTED_OK=1
log "all up (${SERVICES# }) in ${SECONDS} s; source $RUN_DIR/env.sh; stop with $HERE/down.sh $RUN_DIR"
