# beanstalkd 1.12: two instances on 127.0.0.1, each with its own binlog (-b) so jobs survive
# SIGKILL. Instance a serves `beanstalk` (one server); a and b together serve `beanstalk-ha`
# (a multi-host URL: producer failover, consumers on both).
#
# Ports: a = $MQPRIMER_BEANSTALKD_PORT (default 31300), b = that + 1.
# Acting on one instance (fault tests): MQPRIMER_BEANSTALKD_INSTANCE=a|b limits up/down/kill
# to that instance, e.g. `MQPRIMER_BEANSTALKD_INSTANCE=b scripts/brokers kill beanstalkd`;
# `scripts/brokers up beanstalkd` restarts whichever instance is not running.
# Pid files: $RUN/beanstalkd/{a,b}.pid; binlogs: $RUN/beanstalkd/{a,b}/.
beanstalkd_packages=(beanstalkd)

_bs_dir() { echo "$RUN/beanstalkd"; }
_bs_port() {  # _bs_port INSTANCE
  local base="${MQPRIMER_BEANSTALKD_PORT:-31300}"
  case "$1" in a) echo "$base" ;; b) echo $((base + 1)) ;; *) die "beanstalkd: unknown instance '$1' (a or b)" ;; esac
}
_bs_instances() {
  case "${MQPRIMER_BEANSTALKD_INSTANCE:-}" in
    "") echo "a b" ;;
    a|b) echo "$MQPRIMER_BEANSTALKD_INSTANCE" ;;
    *) die "MQPRIMER_BEANSTALKD_INSTANCE must be a or b, not '$MQPRIMER_BEANSTALKD_INSTANCE'" ;;
  esac
}

# _bs_stats PORT: one real protocol round trip (`stats` must answer `OK <bytes>`)
_bs_stats() {
  local line=""
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'stats\r\n' >&3
  IFS= read -r -t 2 line <&3 || true
  exec 3<&- 3>&-
  [[ "$line" == OK\ * ]]
}

_bs_up_one() {
  local i="$1" d port pid
  d="$(_bs_dir)"; port="$(_bs_port "$i")"
  mkdir -p "$d/$i"
  pid=$(pid_of "$d/$i.pid")
  if alive "$pid" && _bs_stats "$port"; then return 0; fi
  [ -n "$pid" ] && ! alive "$pid" && rm -f "$d/$i.pid"
  # -f 50: fsync the binlog at most every 50 ms (beanstalkd's default is no fsync at all)
  nohup beanstalkd -l 127.0.0.1 -p "$port" -b "$d/$i" -f 50 >>"$d/$i.log" 2>&1 &
  started "beanstalkd $i on 127.0.0.1:$port" "$d/$i.pid" "$d/$i.log" $! "'stats'" _bs_stats "$port"
}

beanstalkd_up() {
  local i
  for i in $(_bs_instances); do _bs_up_one "$i"; done
  add_url beanstalk "beanstalk://127.0.0.1:$(_bs_port a)"
  add_url beanstalk-ha "beanstalk://127.0.0.1:$(_bs_port a),127.0.0.1:$(_bs_port b)"
}

beanstalkd_down() {
  local i d; d="$(_bs_dir)"
  for i in $(_bs_instances); do stop_pid "$d/$i.pid" 10; done
  [ -n "${MQPRIMER_BEANSTALKD_INSTANCE:-}" ] || drop_urls beanstalk
}

beanstalkd_status() {
  local i d pid port; d="$(_bs_dir)"
  for i in a b; do
    pid=$(pid_of "$d/$i.pid"); port="$(_bs_port "$i")"
    if alive "$pid" && _bs_stats "$port" 2>/dev/null; then
      echo "beanstalkd-$i: up on 127.0.0.1:$port (pid $pid)"
    else
      echo "beanstalkd-$i: down"
    fi
  done
}

# SIGKILL (fault tests); the binlog stays, `up` restarts with every confirmed job
beanstalkd_kill() {
  local i d pid; d="$(_bs_dir)"
  for i in $(_bs_instances); do
    pid=$(pid_of "$d/$i.pid")
    if [ -n "$pid" ] && alive "$pid"; then
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.05; done
    fi
    rm -f "$d/$i.pid"
  done
}

# the running instances' pids (MQPRIMER_BEANSTALKD_INSTANCE limits them to one)
beanstalkd_pids() {
  local i pid
  for i in $(_bs_instances); do
    pid=$(pid_of "$(_bs_dir)/$i.pid")
    if alive "$pid"; then echo "$pid"; fi
  done
}
