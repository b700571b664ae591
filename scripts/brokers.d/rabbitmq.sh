# RabbitMQ 3.10 (AMQP 0-9-1, AMQPS, and the STOMP plugin on the same node).
#
# A private node, never the system service: /usr/lib/rabbitmq/bin/rabbitmq-server run
# directly (the Debian wrapper switches user and uses /var), all state under
# $RUN/rabbitmq, every listener on 127.0.0.1, its own epmd (port 34369, loopback) and its
# own Erlang cookie (HOME=$RUN/rabbitmq/home). Ports: AMQP 35672, AMQPS 35671, STOMP 36613,
# STOMP over TLS 36614, Erlang distribution 35673, CLI distribution 35680-35689.
#
# Users come from a definitions file imported at boot (no slow rabbitmqctl round trips):
#   mqprimer / mqprimer-secret   all permissions on vhost /   (the URLs below)
#   mqprimer-limited / zq7pw     may log in to / but configure/write/read nothing
#                                (tests of ACCESS_REFUSED)
# `kill` SIGKILLs the node (fault tests); `up` then restarts it over the stale pid file
# and the still-running epmd. `down` stops the node and our epmd, nothing else.
rabbitmq_packages=(rabbitmq-server openssl)

RMQ_NODE="mqprimer@localhost"
RMQ_AMQP_PORT=35672
RMQ_AMQPS_PORT=35671
RMQ_STOMP_PORT=36613
RMQ_STOMPS_PORT=36614
RMQ_DIST_PORT=35673
RMQ_EPMD_PORT=34369
RMQ_USER=mqprimer
RMQ_PASS=mqprimer-secret

_rmq_env() {  # the environment every rabbitmq-server / rabbitmqctl call shares
  local d="$RUN/rabbitmq"
  export HOME="$d/home"
  export ERL_EPMD_PORT=$RMQ_EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_CONF_ENV_FILE=/dev/null
  export RABBITMQ_NODENAME=$RMQ_NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$RMQ_AMQP_PORT RABBITMQ_DIST_PORT=$RMQ_DIST_PORT
  export RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/rabbitmq.pid"
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_DIST_PORT_MIN=35680 RABBITMQ_CTL_DIST_PORT_MAX=35689
}

_rmq_ctl() { (_rmq_env; /usr/lib/rabbitmq/bin/rabbitmqctl -n "$RMQ_NODE" "$@"); }

# RabbitMQ's definitions format wants salted SHA-256 hashes, not passwords.
_rmq_hash() {
  python3 -c 'import base64,hashlib,os,sys; s=os.urandom(4); p=sys.argv[1].encode()
print(base64.b64encode(s+hashlib.sha256(s+p).digest()).decode())' "$1"
}

_rmq_write_config() {
  local d="$RUN/rabbitmq"
  mkdir -p "$d/home" "$d/mnesia" "$d/log"
  ensure_tls
  echo '[rabbitmq_stomp].' > "$d/enabled_plugins"
  echo '[].' > "$d/advanced.config"
  cat > "$d/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$RMQ_AMQP_PORT
listeners.ssl.1 = 127.0.0.1:$RMQ_AMQPS_PORT
ssl_options.cacertfile = $RUN/tls/ca.pem
ssl_options.certfile = $RUN/tls/server.pem
ssl_options.keyfile = $RUN/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
stomp.listeners.tcp.1 = 127.0.0.1:$RMQ_STOMP_PORT
stomp.listeners.ssl.1 = 127.0.0.1:$RMQ_STOMPS_PORT
load_definitions = $d/definitions.json
log.file.level = info
log.console = false
EOF
  cat > "$d/definitions.json" <<EOF
{
  "vhosts": [{"name": "/"}],
  "users": [
    {"name": "$RMQ_USER", "password_hash": "$(_rmq_hash "$RMQ_PASS")",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]},
    {"name": "mqprimer-limited", "password_hash": "$(_rmq_hash zq7pw)",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []}
  ],
  "permissions": [
    {"user": "$RMQ_USER", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
    {"user": "mqprimer-limited", "vhost": "/", "configure": "^\$", "write": "^\$", "read": "^\$"}
  ]
}
EOF
}

_rmq_epmd_up() {
  local d="$RUN/rabbitmq" pid
  pid=$(pid_of "$d/epmd.pid")
  if alive "$pid"; then return 0; fi
  # Foreground epmd in the background, so we know its pid and stop only ours.
  setsid epmd -port "$RMQ_EPMD_PORT" -address 127.0.0.1 </dev/null >>"$d/log/epmd.log" 2>&1 9>&- &
  echo $! > "$d/epmd.pid"
  wait_for 10 "$!" bash -c "exec 3<>/dev/tcp/127.0.0.1/$RMQ_EPMD_PORT" \
    || fail_with_log rabbitmq "$d/log/epmd.log" "private epmd did not start on port $RMQ_EPMD_PORT"
}

_rmq_publish_urls() {
  add_url amqp "amqp://$RMQ_USER:$RMQ_PASS@127.0.0.1:$RMQ_AMQP_PORT/"
  add_url amqps "amqps://$RMQ_USER:$RMQ_PASS@127.0.0.1:$RMQ_AMQPS_PORT/?cafile=$RUN/tls/ca.pem"
  if [ -f "$ROOT/src/mqprimer/backends/stomp.py" ]; then
    add_url stomp-rabbitmq "stomp://$RMQ_USER:$RMQ_PASS@127.0.0.1:$RMQ_STOMP_PORT/"
    add_url stomp+ssl-rabbitmq "stomp+ssl://$RMQ_USER:$RMQ_PASS@127.0.0.1:$RMQ_STOMPS_PORT/?cafile=$RUN/tls/ca.pem"
  fi
}

_rmq_up() {
  local d="$RUN/rabbitmq" log pid
  log="$d/log/server.out"
  pid=$(pid_of "$d/rabbitmq.pid")
  if alive "$pid"; then _rmq_publish_urls; return 0; fi
  rm -f "$d/rabbitmq.pid"  # stale after SIGKILL
  _rmq_write_config
  _rmq_epmd_up
  (
    _rmq_env
    # The script stays as a signal-relaying shell around the VM; the node writes the VM's
    # own pid to rabbitmq.pid (that is the one `kill` and `status` use).
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >>"$log" 2>&1 9>&- &
    echo $! > "$d/launch.pid"
  )
  local launch; launch=$(pid_of "$d/launch.pid")
  # `wait` returns when the app is running; alongside, watch the VM so a crash fails fast.
  _rmq_ctl wait "$d/rabbitmq.pid" --timeout 90 >>"$d/log/wait.out" 2>&1 9>&- &
  local waiter=$!
  while alive "$waiter"; do
    if ! alive "$launch"; then
      kill "$waiter" 2>/dev/null || true
      fail_with_log rabbitmq "$log" "the node exited while starting (see $d/log)"
    fi
    sleep 0.2
  done
  wait "$waiter" || fail_with_log rabbitmq "$d/log/wait.out" "node $RMQ_NODE did not become ready"
  wait_for 20 "$launch" bash -c "exec 3<>/dev/tcp/127.0.0.1/$RMQ_AMQP_PORT" \
    || fail_with_log rabbitmq "$log" "AMQP port $RMQ_AMQP_PORT not listening"
  _rmq_publish_urls
}

_rmq_down() {
  local d="$RUN/rabbitmq" pid
  drop_urls amqp
  drop_urls stomp-rabbitmq
  drop_urls stomp+ssl-rabbitmq
  pid=$(pid_of "$d/rabbitmq.pid")
  if alive "$pid"; then
    _rmq_ctl shutdown >/dev/null 2>&1 || true
    stop_pid "$d/rabbitmq.pid" 10
  fi
  rm -f "$d/rabbitmq.pid" "$d/launch.pid"
  stop_pid "$d/epmd.pid" 5
  # A test broker starts empty each session: after a SIGKILL the node re-checks every
  # durable queue (~60 ms each here), so queues left by old runs slow every fault test.
  rm -rf "$d/mnesia"
}

rabbitmq_status() {
  local pid; pid=$(pid_of "$RUN/rabbitmq/rabbitmq.pid")
  if alive "$pid"; then
    echo "rabbitmq: up (pid $pid, amqp 127.0.0.1:$RMQ_AMQP_PORT, amqps :$RMQ_AMQPS_PORT, stomp :$RMQ_STOMP_PORT)"
  else
    echo "rabbitmq: down"
  fi
}

_rmq_kill() {
  local pid; pid=$(pid_of "$RUN/rabbitmq/rabbitmq.pid")
  if alive "$pid"; then kill -9 "$pid"; fi
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
}

# Test processes run `up`/`kill` concurrently (fault tests of several suites share this
# node): one at a time, so a second `up` waits and then finds the node running. The lock
# is fd 9 of a subshell; everything started in the background closes it (9>&-), or the
# node would hold the lock for its whole life.
_rmq_locked() { mkdir -p "$RUN"; ( flock -w 300 9 || die "rabbitmq: harness lock busy for 300 s"; "$@" ) 9>"$RUN/rabbitmq.lock"; }
rabbitmq_up() { _rmq_locked _rmq_up; }
rabbitmq_down() { _rmq_locked _rmq_down; }
rabbitmq_kill() { _rmq_locked _rmq_kill; }

# clean: delete every queue of vhost / (scripts/test, between its phases). A restart after a
# SIGKILL re-checks each durable queue (25-60 ms each here) and a test session leaves hundreds:
# 1240 queues made each restart of the fault tests take ~30 s instead of ~3 s. One rabbitmqctl
# call (each call boots an Erlang VM), whatever the number of queues.
_rmq_clean() {
  local pid; pid=$(pid_of "$RUN/rabbitmq/rabbitmq.pid")
  alive "$pid" || return 0
  _rmq_ctl eval 'Qs = rabbit_amqqueue:list(<<"/">>),
    [rabbit_amqqueue:delete(Q, false, false, <<"mqprimer-harness">>) || Q <- Qs], length(Qs).' 9>&- \
    | sed 's/^/rabbitmq: queues deleted: /' >&2
}
rabbitmq_clean() { _rmq_locked _rmq_clean; }

# The Erlang VM's pid (freeze/thaw; the launching shell only relays signals)
rabbitmq_pids() {
  local pid; pid=$(pid_of "$RUN/rabbitmq/rabbitmq.pid")
  if alive "$pid"; then echo "$pid"; fi
}
