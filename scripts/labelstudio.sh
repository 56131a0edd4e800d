#!/usr/bin/env bash
# Label Studio for faceloop's human review: install into its own venv, start/stop/status.
#
#   scripts/labelstudio.sh install          # idempotent; <repo>/.venv-labelstudio
#   scripts/labelstudio.sh start|stop|status|env
#   scripts/labelstudio.sh add-user EMAIL   # an annotator login (signup is closed); password and
#                                           # API token go to <data dir>/annotators/ (mode 600)
#
# Why its own venv: label-studio 1.23.2 pins python-json-logger/redis/pyarrow/pytz versions that
# conflict with Prefect 3.9 (see shared SERVICES.md). The project venv only has the SDK.
#
# Environment (all optional):
#   LS_VENV          Label Studio's venv; default <repo>/.venv-labelstudio (faceloop review reads it too)
#   LS_DATA_DIR      data dir (SQLite DB, uploads, pid, log, credentials); default <repo>/var/labelstudio
#   LS_PORT          default 8080;  LS_HOST is always 127.0.0.1 (never 0.0.0.0)
#   LS_DB            sqlite (default) | postgresql  (then POSTGRE_NAME/USER/PASSWORD/HOST/PORT as LS reads them)
#   LS_ADMIN_EMAIL   default admin@faceloop.local
#   LS_ADMIN_PASSWORD, LABEL_STUDIO_API_KEY (or FACELOOP_REVIEW__TOKEN): generated into the data
#                    dir (mode 600) on first start when unset, reused afterwards
#   LS_ALLOW_LOCAL_WEBHOOKS=1  turn LS's SSRF protection off so webhooks may reach 127.0.0.1
#                    (needed for `faceloop review webhook` on the same host; it is a security
#                    control, so it is off only when asked for)
#   LS_START_TIMEOUT seconds to wait for /health (default 180; the first start migrates the DB)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LS_VENV:-$REPO/.venv-labelstudio}"
LS_VERSION="1.23.2"
DATA_DIR="${LS_DATA_DIR:-$REPO/var/labelstudio}"
PORT="${LS_PORT:-8080}"
HOST="127.0.0.1"
PIDFILE="$DATA_DIR/labelstudio.pid"
LOGFILE="$DATA_DIR/labelstudio.log"

log() { echo "labelstudio: $*" >&2; }

installed() {
  [ -x "$VENV/bin/label-studio" ] && \
    [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null)" = "$LS_VERSION" ]
}

cmd_install() {
  if installed; then
    log "label-studio $LS_VERSION already installed in $VENV"
    return 0
  fi
  local py="${LS_PYTHON:-python3}"
  local t0=$SECONDS
  log "installing label-studio $LS_VERSION into $VENV (takes a few minutes)"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "label-studio==$LS_VERSION"
  installed || { log "install finished but label-studio $LS_VERSION is not importable"; return 1; }
  log "installed in $((SECONDS - t0)) s"
}

# Reads a secret from the env, else from a 600 file in the data dir, else generates one there.
secret() {  # name value-from-env
  local file="$DATA_DIR/$1"
  if [ -n "${2:-}" ]; then printf '%s' "$2"; return; fi
  if [ ! -s "$file" ]; then
    (umask 077; "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(20), end="")' > "$file")
  fi
  cat "$file"
}

running_pid() {
  [ -s "$PIDFILE" ] || return 1
  local pid; pid="$(cat "$PIDFILE")"
  kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
  return 1
}

# Whether something accepts connections on HOST:PORT (another program, or a Label Studio this
# script did not start: label-studio itself would then quietly take the next free port and
# the /health wait below would last its whole timeout).
port_taken() {
  "$VENV/bin/python" - "$HOST" "$PORT" <<'EOF' 2>/dev/null
import socket, sys
with socket.socket() as s:
    s.settimeout(2)
    sys.exit(0 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
EOF
}

healthy() {
  "$VENV/bin/python" - "$HOST" "$PORT" <<'EOF' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/health", timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

cmd_start() {
  installed || { log "not installed: run $0 install"; return 1; }
  mkdir -p "$DATA_DIR"; chmod 700 "$DATA_DIR"
  # The database holds the annotators' answers and the tasks' face crops: owner only, also for
  # files an older start left readable.
  chmod -R go-rwx "$DATA_DIR"
  if pid="$(running_pid)"; then
    log "already running (pid $pid) on http://$HOST:$PORT"
    return 0
  fi
  if port_taken; then
    log "$HOST:$PORT is already in use by another program: stop it, or give Label Studio another port (review.url)"
    return 1
  fi
  local email="${LS_ADMIN_EMAIL:-admin@faceloop.local}"
  local password token
  password="$(secret admin-password "${LS_ADMIN_PASSWORD:-}")"
  token="$(secret admin-token "${LABEL_STUDIO_API_KEY:-${FACELOOP_REVIEW__TOKEN:-}}")"
  local ssrf=true
  [ "${LS_ALLOW_LOCAL_WEBHOOKS:-0}" = "1" ] && ssrf=false
  local t0=$SECONDS
  # Every variable here mattered for a headless, offline start (SERVICES.md). The legacy token
  # must be on when the organisation is first created, else the preset token gives 401.
  # Images reach LS as data URIs inside tasks, so local-files serving stays off.
  (
    cd "$DATA_DIR"
    umask 077
    env LABEL_STUDIO_BASE_DATA_DIR="$DATA_DIR" \
      DJANGO_DB="${LS_DB:-sqlite}" \
      LABEL_STUDIO_USERNAME="$email" LABEL_STUDIO_PASSWORD="$password" \
      LABEL_STUDIO_USER_TOKEN="$token" LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
      LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
      LOCAL_FILES_SERVING_ENABLED=false \
      SSRF_PROTECTION_ENABLED="$ssrf" \
      SENTRY_DSN= FRONTEND_SENTRY_DSN= LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
      setsid "$VENV/bin/label-studio" start --no-browser --internal-host "$HOST" -p "$PORT" \
      >"$LOGFILE" 2>&1 < /dev/null &
    echo $! > "$PIDFILE"
  )
  local deadline=$((SECONDS + ${LS_START_TIMEOUT:-180}))
  until healthy; do
    if ! running_pid >/dev/null; then
      log "exited during start; last log lines:"; tail -n 20 "$LOGFILE" >&2; return 1
    fi
    if [ $SECONDS -ge $deadline ]; then
      log "no healthy /health after ${LS_START_TIMEOUT:-180} s; see $LOGFILE"; cmd_stop; return 1
    fi
    sleep 1
  done
  log "up on http://$HOST:$PORT in $((SECONDS - t0)) s (pid $(cat "$PIDFILE")); login $email, password in $DATA_DIR/admin-password"
}

cmd_stop() {
  local pid
  if ! pid="$(running_pid)"; then log "not running"; rm -f "$PIDFILE"; return 0; fi
  # setsid made the server a process-group leader: stop its workers with it.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  log "stopped (pid $pid)"
}

cmd_status() {
  local pid
  if pid="$(running_pid)" && healthy; then
    echo "running pid=$pid url=http://$HOST:$PORT data=$DATA_DIR"
  elif pid="$(running_pid)"; then
    echo "starting-or-unhealthy pid=$pid url=http://$HOST:$PORT"; return 1
  else
    echo "stopped"; return 3
  fi
}

# Prints the url and token for `faceloop review ...` (token comes from the 600 file).
cmd_env() {
  echo "FACELOOP_REVIEW__URL=http://$HOST:$PORT"
  [ -s "$DATA_DIR/admin-token" ] && echo "FACELOOP_REVIEW__TOKEN=$(cat "$DATA_DIR/admin-token")"
}

# An annotator account in the server's own database (same env as start: data dir, LS_DB, POSTGRE_*).
cmd_add_user() {
  installed || { log "not installed: run $0 install"; return 1; }
  [ -n "${1:-}" ] || { echo "usage: $0 add-user EMAIL" >&2; return 64; }
  [ -d "$DATA_DIR" ] || { log "no data dir $DATA_DIR: start Label Studio once first"; return 1; }
  env LABEL_STUDIO_BASE_DATA_DIR="$DATA_DIR" DJANGO_DB="${LS_DB:-sqlite}" \
    LS_USER_EMAIL="$1" LS_USER_DIR="$DATA_DIR/annotators" \
    SENTRY_DSN= FRONTEND_SENTRY_DSN= LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
    "$VENV/bin/python" "$REPO/scripts/ls_user.py"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  add-user) shift; cmd_add_user "$@" ;;
  *) echo "usage: $0 install|start|stop|status|env|add-user EMAIL" >&2; exit 64 ;;
esac
