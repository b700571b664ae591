# gearmand 1.1.20: two instances on 127.0.0.1, each with its own sqlite queue
# (-q libsqlite3) so background jobs survive SIGKILL (the builtin queue loses them).
# Instance a serves `gearman` (one server); a and b together serve `gearman-ha`
# (a multi-host URL: producer failover, consumers on both).
#
# Ports: a = $MQPRIMER_GEARMAND_PORT (default 34730), b = that + 1.
# Acting on one instance (fault tests): MQPRIMER_GEARMAND_INSTANCE=a|b limits up/down/kill
# to that instance, e.g. `MQPRIMER_GEARMAND_INSTANCE=b scripts/brokers kill gearmand`;
# `scripts/brokers up gearmand` restarts whichever instance is not running.
# Files: $RUN/gearmand/{a,b}.pid, {a,b}.log, {a,b}/queue.db (the persistent queue),
# {a,b}/gearmand.conf (empty: nothing is read from /etc).
gearmand_packages=(gearman-job-server)

_gm_dir() { echo "$RUN/gearmand"; }
_gm_port() {  # _gm_port INSTANCE
  local base="${MQPRIMER_GEARMAND_PORT:-34730}"
  case "$1" in a) echo "$base" ;; b) echo $((base + 1)) ;; *) die "gearmand: unknown instance '$1' (a or b)" ;; esac
}
_gm_instances() {
  case "${MQPRIMER_GEARMAND_INSTANCE:-}" in
    "") echo "a b" ;;
    a|b) echo "$MQPRIMER_GEARMAND_INSTANCE" ;;
    *) die "MQPRIMER_GEARMAND_INSTANCE must be a or b, not '$MQPRIMER_GEARMAND_INSTANCE'" ;;
  esac
}

# _gm_version PORT: one real protocol round trip (the text admin command `version` must
# answer `OK <version>`); /dev/tcp keeps it free of gearadmin's own retries
_gm_version() {
  local line=""
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'version\n' >&3
  IFS= read -r -t 2 line <&3 || true
  exec 3<&- 3>&-
  [[ "$line" == OK\ * ]]
}

_gm_up_one() {
  local i="$1" d port pid
  d="$(_gm_dir)"; port="$(_gm_port "$i")"
  mkdir -p "$d/$i"
  pid=$(pid_of "$d/$i.pid")
  if alive "$pid" && _gm_version "$port"; then return 0; fi
  [ -n "$pid" ] && ! alive "$pid" && rm -f "$d/$i.pid"
  : > "$d/$i/gearmand.conf"
  # -t 1: one I/O thread is plenty for tests on 2 shared cores; --verbose=WARNING keeps the
  # log small. gearmand writes its own pid file too (--pid-file), but the one that counts is
  # ours: written before the server has finished starting.
  nohup gearmand --listen=127.0.0.1 --port="$port" --config-file="$d/$i/gearmand.conf" \
    --log-file="$d/$i.log" --pid-file="$d/$i/gearmand.pid" --verbose=WARNING --threads=1 \
    -q libsqlite3 --libsqlite3-db="$d/$i/queue.db" >>"$d/$i.log" 2>&1 &
  started "gearmand $i on 127.0.0.1:$port" "$d/$i.pid" "$d/$i.log" $! "'version'" _gm_version "$port"
}

gearmand_up() {
  local i
  for i in $(_gm_instances); do _gm_up_one "$i"; done
  add_url gearman "gearman://127.0.0.1:$(_gm_port a)"
  add_url gearman-ha "gearman://127.0.0.1:$(_gm_port a),127.0.0.1:$(_gm_port b)"
}

gearmand_down() {
  local i d; d="$(_gm_dir)"
  for i in $(_gm_instances); do stop_pid "$d/$i.pid" 10; done
  [ -n "${MQPRIMER_GEARMAND_INSTANCE:-}" ] || drop_urls gearman
}

gearmand_status() {
  local i d pid port; d="$(_gm_dir)"
  for i in a b; do
    pid=$(pid_of "$d/$i.pid"); port="$(_gm_port "$i")"
    if alive "$pid" && _gm_version "$port" 2>/dev/null; then
      echo "gearmand-$i: up on 127.0.0.1:$port (pid $pid)"
    else
      echo "gearmand-$i: down"
    fi
  done
}

gearmand_pids() {
  local i d pid; d="$(_gm_dir)"
  for i in $(_gm_instances); do
    pid=$(pid_of "$d/$i.pid")
    if alive "$pid"; then echo "$pid"; fi
  done
}

# SIGKILL (fault tests); the sqlite queue stays, `up` restarts with every background job
gearmand_kill() {
  local i d pid; d="$(_gm_dir)"
  for i in $(_gm_instances); do
    pid=$(pid_of "$d/$i.pid")
    if [ -n "$pid" ] && alive "$pid"; then
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.05; done
    fi
    rm -f "$d/$i.pid"
  done
}
