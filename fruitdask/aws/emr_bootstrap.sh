#!/usr/bin/env bash
# fruitdask EMR bootstrap action: install fruitdask on this node, then start the
# Dask scheduler (primary node) or a Dask worker (every other node) and exit.
#
# EMR runs bootstrap actions on every node, as the hadoop user, before the
# cluster's applications start. The node's role comes from the instance info
# files EMR writes on every node under /mnt/var/lib/info: instance.json
# "isMaster" (true on the primary node only), and job-flow.json
# "masterPrivateDnsName" for the scheduler's address (the fake nodes in
# tests/test_deploy_emr.py carry the same fields). The daemons run as systemd units,
# started without waiting (--no-block), so this script returns as soon as the
# install is done; a worker that starts before the scheduler keeps retrying.
# Their output goes to LOG_DIR, which a third unit copies to the cluster's log
# URI (--log-uri) every --log-interval seconds and once more when it stops:
#   <log uri>/<cluster id>/fruitdask/<node>/{scheduler,worker}.log
#
# Runs on EMR 7.x (Amazon Linux 2023: python3.11 from dnf). EMR 6.x runs Amazon
# Linux 2, which has no Python 3.11: `fruitdask emr` refuses those releases, and
# this script stops with one line if it meets one.
#
# Outside EMR (tests, a laptop):
#   --info-dir DIR     read instance.json / job-flow.json from DIR
#   --no-systemd       start background processes, pid files in PREFIX/run
#   --skip-install     no dnf/venv/pip: run with --python (an interpreter that has fruitdask)
#   --systemd-dir DIR  write the units there (with SYSTEMCTL=echo: nothing started)
#   --stop             (with --no-systemd) stop what an earlier run started, ship the logs
#   --node-name NAME   this node's folder under the log URI (default: the host name)
#   environment: SYSTEMCTL (default systemctl), SUDO (default sudo unless root)
#
# Usage (as an EMR bootstrap action, arguments in "Args"):
#   bootstrap.sh --package s3://bucket/fruitdask-0.1.0-py3-none-any.whl \
#                [--constraints s3://bucket/requirements.txt] [--prefix /opt/fruitdask]
#                [--scheduler-port 8786] [--dashboard-port 8787] [--nthreads N]
#                [--memory-limit auto] [--bind HOST] [--local-dir DIR]
#                [--log-uri s3://bucket/logs/] [--log-dir DIR] [--log-interval 60]
set -euo pipefail

PACKAGE=""
CONSTRAINTS=""
PREFIX=/opt/fruitdask
INFO_DIR=/mnt/var/lib/info
SCHEDULER_PORT=8786
DASHBOARD_PORT=8787
BIND=""               # listen address; empty = every interface (EMR's security groups fence it)
NTHREADS=""           # threads per worker; empty = one per vCPU
MEMORY_LIMIT=auto
LOCAL_DIR=/mnt/fruitdask-dask   # /mnt is the large instance-store/EBS volume on EMR
PYTHON=""             # empty = python3.11 from dnf (Amazon Linux 2023's system Python is 3.9)
SYSTEMD=1
SYSTEMD_DIR=/etc/systemd/system
SKIP_INSTALL=0
ACTION=start
LOG_URI=""            # empty: the daemons' logs stay on the node
LOG_DIR=""            # empty: /mnt/var/log/fruitdask (systemd), PREFIX/run (--no-systemd)
LOG_INTERVAL=60
NODE_NAME=""
SYSTEMCTL=${SYSTEMCTL:-systemctl}

die() { echo "fruitdask-bootstrap: error: $*" >&2; exit 2; }
log() { echo "fruitdask-bootstrap: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --package) PACKAGE=$2; shift 2 ;;
    --constraints) CONSTRAINTS=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --info-dir) INFO_DIR=$2; shift 2 ;;
    --scheduler-port) SCHEDULER_PORT=$2; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT=$2; shift 2 ;;
    --bind) BIND=$2; shift 2 ;;
    --nthreads) NTHREADS=$2; shift 2 ;;
    --memory-limit) MEMORY_LIMIT=$2; shift 2 ;;
    --local-dir) LOCAL_DIR=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    --systemd-dir) SYSTEMD_DIR=$2; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --stop) ACTION=stop; shift ;;
    --log-uri) LOG_URI=$2; shift 2 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --log-interval) LOG_INTERVAL=$2; shift 2 ;;
    --node-name) NODE_NAME=$2; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done

RUN_DIR=$PREFIX/run
if [ -z "$LOG_DIR" ]; then
  if [ "$SYSTEMD" = 1 ]; then LOG_DIR=/mnt/var/log/fruitdask; else LOG_DIR=$RUN_DIR; fi
fi
NODE_NAME=${NODE_NAME:-$(hostname)}
# Root-owned places need sudo on EMR (the script runs as hadoop); SUDO= overrides.
if [ -z "${SUDO+set}" ]; then
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=""; fi
fi

stop_processes() {
  local f pid
  for f in "$RUN_DIR"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

if [ "$ACTION" = stop ]; then
  [ "$SYSTEMD" = 0 ] || die "--stop is for --no-systemd; use systemctl stop fruitdask-dask-*"
  stop_processes
  if [ -r "$RUN_DIR/ship-logs.sh" ]; then
    bash "$RUN_DIR/ship-logs.sh" || log "could not copy the logs"
  fi
  exit 0
fi

# ---- role and primary address, from EMR's instance info files
[ -r "$INFO_DIR/instance.json" ] || die "$INFO_DIR/instance.json not found (not on EMR? use --info-dir)"
[ -r "$INFO_DIR/job-flow.json" ] || die "$INFO_DIR/job-flow.json not found (use --info-dir)"
JSON_PY=$(command -v python3 || command -v python || true)
[ -n "$JSON_PY" ] || die "python3 is needed to read the instance info files"
json_get() {  # FILE KEY: prints the value ("true"/"false" for booleans)
  "$JSON_PY" -c 'import json, sys
v = json.load(open(sys.argv[1])).get(sys.argv[2])
print(str(v).lower() if isinstance(v, bool) else ("" if v is None else v))' "$1" "$2"
}
IS_PRIMARY=$(json_get "$INFO_DIR/instance.json" isMaster)
PRIMARY_HOST=$(json_get "$INFO_DIR/job-flow.json" masterPrivateDnsName)
case "$IS_PRIMARY" in
  true) ROLE=scheduler ;;
  false) ROLE=worker
         [ -n "$PRIMARY_HOST" ] || die "no masterPrivateDnsName in $INFO_DIR/job-flow.json" ;;
  *) die "no isMaster in $INFO_DIR/instance.json" ;;
esac
log "role: $ROLE (primary: ${PRIMARY_HOST:-?})"
CLUSTER_ID=$(json_get "$INFO_DIR/job-flow.json" jobFlowId)
LOG_DEST=""
[ -z "$LOG_URI" ] || LOG_DEST=${LOG_URI%/}/${CLUSTER_ID:-unknown-cluster}/fruitdask/$NODE_NAME

# ---- install
fetch() {  # URL-or-path DIR: prints a local path (pip cannot read s3://)
  case "$1" in
    s3://*) aws s3 cp --only-show-errors "$1" "$2/" >&2; echo "$2/$(basename "$1")" ;;
    *) echo "$1" ;;
  esac
}
$SUDO mkdir -p "$PREFIX" "$RUN_DIR"
$SUDO chown "$(id -u):$(id -g)" "$PREFIX" "$RUN_DIR"
if [ "$SKIP_INSTALL" = 1 ]; then
  [ -n "$PYTHON" ] || die "--skip-install needs --python (an interpreter with fruitdask)"
  PY=$PYTHON
else
  [ -n "$PACKAGE" ] || die "--package is required (an s3:// wheel of fruitdask or a pip spec)"
  if [ -z "$PYTHON" ]; then
    command -v dnf >/dev/null 2>&1 || die "no dnf: this is not Amazon Linux 2023 (EMR 7.x); \
EMR 6.x runs Amazon Linux 2, which has no Python 3.11 for fruitdask: use emr-7.x"
    $SUDO dnf install -y -q python3.11 python3.11-pip >&2 || die "dnf could not install python3.11"
    PYTHON=python3.11
  fi
  "$PYTHON" -m venv "$PREFIX/venv"
  PY=$PREFIX/venv/bin/python
  mkdir -p "$PREFIX/dist"
  PKG=$(fetch "$PACKAGE" "$PREFIX/dist")
  PIP_ARGS=(--quiet --disable-pip-version-check)
  if [ -n "$CONSTRAINTS" ]; then PIP_ARGS+=(-c "$(fetch "$CONSTRAINTS" "$PREFIX/dist")"); fi
  "$PY" -m pip install "${PIP_ARGS[@]}" "$PKG" >&2
fi
"$PY" -c 'import fruitdask, distributed' || die "$PY cannot import fruitdask and distributed"
$SUDO mkdir -p "$LOG_DIR"
$SUDO chown "$(id -u):$(id -g)" "$LOG_DIR"
if [ -n "$LOG_DEST" ]; then
  # copies the logs to the log URI: every LOG_INTERVAL seconds with "loop", else once
  {
    echo '#!/bin/bash'
    printf 'PY=%q\nLOG_DIR=%q\nLOG_DEST=%q\nINTERVAL=%q\n' "$PY" "$LOG_DIR" "$LOG_DEST" "$LOG_INTERVAL"
    cat <<'SHIP'
ship() {
  "$PY" -c 'import sys; from fruitdask.aws.emr import ship_logs; ship_logs(sys.argv[1], sys.argv[2])' \
    "$LOG_DIR" "$LOG_DEST"
}
if [ "${1:-}" = loop ]; then
  while :; do ship || true; sleep "$INTERVAL"; done
else
  ship
fi
SHIP
  } > "$RUN_DIR/ship-logs.sh"
fi

# spark-submit needs a script, not `-m spark_parity`: the same launcher on every node.
cat > "$PREFIX/spark_parity_main.py" <<'EOF'
import sys

from spark_parity.cli import main

sys.exit(main())
EOF

# ---- the Dask process for this role
if [ "$ROLE" = scheduler ]; then
  CMD=("$PY" -m distributed.cli.dask_scheduler --port "$SCHEDULER_PORT"
       --dashboard-address "$BIND:$DASHBOARD_PORT")
  [ -z "$BIND" ] || CMD+=(--host "$BIND")
else
  CMD=("$PY" -m distributed.cli.dask_worker "tcp://$PRIMARY_HOST:$SCHEDULER_PORT"
       --nworkers 1 --memory-limit "$MEMORY_LIMIT" --local-directory "$LOCAL_DIR"
       --name "$(hostname)-$$")
  [ -z "$NTHREADS" ] || CMD+=(--nthreads "$NTHREADS")
  [ -z "$BIND" ] || CMD+=(--host "$BIND")
  $SUDO mkdir -p "$LOCAL_DIR"
  $SUDO chown "$(id -u):$(id -g)" "$LOCAL_DIR"
fi
# One task per thread: BLAS/OpenMP pools inside each would oversubscribe the cores.
ENV=(OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1)
UNIT=fruitdask-dask-$ROLE

if [ "$SYSTEMD" = 1 ]; then
  unit_file=$(mktemp)
  {
    echo "[Unit]"
    echo "Description=fruitdask Dask $ROLE"
    echo "After=network-online.target"
    echo "Wants=network-online.target"
    echo "[Service]"
    echo "Type=simple"
    echo "User=$(id -un)"
    for e in "${ENV[@]}"; do echo "Environment=$e"; done
    printf 'ExecStart='; printf '%q ' "${CMD[@]}"; echo
    echo "StandardOutput=append:$LOG_DIR/$ROLE.log"
    echo "StandardError=append:$LOG_DIR/$ROLE.log"
    echo "Restart=always"
    echo "RestartSec=5"
    echo "[Install]"
    echo "WantedBy=multi-user.target"
  } > "$unit_file"
  $SUDO mkdir -p "$SYSTEMD_DIR"
  $SUDO install -m 0644 "$unit_file" "$SYSTEMD_DIR/$UNIT.service"
  rm -f "$unit_file"
  UNITS=("$UNIT.service")
  if [ -n "$LOG_DEST" ]; then
    unit_file=$(mktemp)
    {
      echo "[Unit]"
      echo "Description=fruitdask: copy the Dask logs to $LOG_DEST"
      echo "After=network-online.target"
      echo "[Service]"
      echo "Type=simple"
      echo "User=$(id -un)"
      echo "ExecStart=/bin/bash $RUN_DIR/ship-logs.sh loop"
      echo "ExecStopPost=/bin/bash $RUN_DIR/ship-logs.sh"
      echo "Restart=always"
      echo "[Install]"
      echo "WantedBy=multi-user.target"
    } > "$unit_file"
    $SUDO install -m 0644 "$unit_file" "$SYSTEMD_DIR/fruitdask-logs.service"
    rm -f "$unit_file"
    UNITS+=(fruitdask-logs.service)
  fi
  $SUDO $SYSTEMCTL daemon-reload
  $SUDO $SYSTEMCTL enable --now --no-block "${UNITS[@]}"
  log "started ${UNITS[*]} (logs: $LOG_DIR${LOG_DEST:+, copied to $LOG_DEST})"
else
  stop_processes
  nohup env "${ENV[@]}" "${CMD[@]}" >> "$LOG_DIR/$ROLE.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$ROLE.pid"
  if [ -n "$LOG_DEST" ]; then
    nohup bash "$RUN_DIR/ship-logs.sh" loop > /dev/null 2>&1 < /dev/null &
    echo $! > "$RUN_DIR/ship.pid"
  fi
  log "started $ROLE (pid $(cat "$RUN_DIR/$ROLE.pid"), log $LOG_DIR/$ROLE.log${LOG_DEST:+, copied to $LOG_DEST})"
fi
