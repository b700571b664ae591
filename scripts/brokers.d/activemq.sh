# ActiveMQ 5.17 (Debian's `activemq` package) as a private instance under $RUN/activemq:
# STOMP on 127.0.0.1:36616, STOMP over TLS on 127.0.0.1:36617 (certificates from ensure_tls),
# KahaDB + scheduler store under the data dir, prioritized queues, one authenticated user.
# Debian's ActiveMQ ignores log4j2 files: logging is configured with a log4j 1.2 properties file.
activemq_packages=(activemq default-jre-headless openssl)

AMQ_STOMP_PORT=36616
AMQ_STOMPS_PORT=36617
AMQ_USER=mqprimer
AMQ_PASS=amq-secret
AMQ_STORE_PASS=mqprimer-keystore

_amq_dir() { echo "$RUN/activemq"; }

_amq_config() {
  local d; d=$(_amq_dir)
  mkdir -p "$d/conf" "$d/data" "$d/tmp"
  ensure_tls
  # Java wants PKCS12 stores: the server key + chain, and the CA as trust anchor for client certs.
  if [ ! -f "$d/conf/broker.p12" ] || [ "$RUN/tls/server.pem" -nt "$d/conf/broker.p12" ]; then
    openssl pkcs12 -export -in "$RUN/tls/server.pem" -inkey "$RUN/tls/server.key" -certfile "$RUN/tls/ca.pem" \
      -name broker -out "$d/conf/broker.p12" -passout "pass:$AMQ_STORE_PASS" \
      || fail_with_log activemq /dev/null "openssl pkcs12 failed"
    rm -f "$d/conf/trust.p12"
    keytool -importcert -noprompt -alias mqprimer-ca -file "$RUN/tls/ca.pem" -keystore "$d/conf/trust.p12" \
      -storetype pkcs12 -storepass "$AMQ_STORE_PASS" >/dev/null 2>&1 \
      || fail_with_log activemq /dev/null "keytool -importcert failed"
  fi
  cat > "$d/conf/log4j.properties" <<EOF
log4j.rootLogger=WARN, logfile
log4j.logger.org.apache.activemq.broker.BrokerService=INFO
log4j.logger.org.apache.activemq.broker.TransportConnector=INFO
log4j.appender.logfile=org.apache.log4j.FileAppender
log4j.appender.logfile.File=$d/activemq.log
log4j.appender.logfile.Append=true
log4j.appender.logfile.layout=org.apache.log4j.PatternLayout
log4j.appender.logfile.layout.ConversionPattern=%d | %-5p | %m | %c | %t%n
EOF
  # Expired messages are dropped rather than moved to ActiveMQ.DLQ (processExpired=false):
  # mqprimer keeps its own dead letters in <queue>.dead. Empty queues nobody consumes are
  # removed after 10 min (the private retry queues of closed topic subscriptions). Integer
  # attributes must be literal (Spring's schema rejects \${...} there).
  cat > "$d/conf/activemq.xml" <<EOF
<beans xmlns="http://www.springframework.org/schema/beans"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
  http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="mqprimer" useJmx="false"
          schedulerSupport="true" persistent="true" advisorySupport="false" dataDirectory="$d/data"
          schedulePeriodForDestinationPurge="60000">
    <destinationPolicy>
      <policyMap>
        <policyEntries>
          <policyEntry queue="&gt;" prioritizedMessages="true" expireMessagesPeriod="1000"
                       gcInactiveDestinations="true" inactiveTimoutBeforeGC="600000">
            <deadLetterStrategy><sharedDeadLetterStrategy processExpired="false"/></deadLetterStrategy>
          </policyEntry>
          <policyEntry topic="&gt;" prioritizedMessages="true" expireMessagesPeriod="1000">
            <deadLetterStrategy><sharedDeadLetterStrategy processExpired="false"/></deadLetterStrategy>
          </policyEntry>
        </policyEntries>
      </policyMap>
    </destinationPolicy>
    <persistenceAdapter>
      <kahaDB directory="$d/data/kahadb"/>
    </persistenceAdapter>
    <plugins>
      <simpleAuthenticationPlugin anonymousAccessAllowed="false">
        <users>
          <authenticationUser username="$AMQ_USER" password="$AMQ_PASS" groups="users,admins"/>
        </users>
      </simpleAuthenticationPlugin>
    </plugins>
    <systemUsage>
      <systemUsage>
        <memoryUsage><memoryUsage limit="128 mb"/></memoryUsage>
        <storeUsage><storeUsage limit="2 gb"/></storeUsage>
        <tempUsage><tempUsage limit="1 gb"/></tempUsage>
      </systemUsage>
    </systemUsage>
    <sslContext>
      <sslContext keyStore="file:$d/conf/broker.p12" keyStorePassword="$AMQ_STORE_PASS" keyStoreType="pkcs12"
                  trustStore="file:$d/conf/trust.p12" trustStorePassword="$AMQ_STORE_PASS" trustStoreType="pkcs12"/>
    </sslContext>
    <transportConnectors>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:$AMQ_STOMP_PORT"/>
      <transportConnector name="stomp+ssl" uri="stomp+ssl://127.0.0.1:$AMQ_STOMPS_PORT?transport.wantClientAuth=true"/>
    </transportConnectors>
  </broker>
</beans>
EOF
}

# _amq_handshake: a real STOMP CONNECT/CONNECTED exchange with the test user
_amq_handshake() {
  timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'"$AMQ_STOMP_PORT"' || exit 1
    printf "CONNECT\naccept-version:1.2\nhost:/\nlogin:%s\npasscode:%s\n\n\0" "$1" "$2" >&3
    IFS= read -r line <&3 && [ "$line" = CONNECTED ]' _ "$AMQ_USER" "$AMQ_PASS"
}

activemq_up() {
  local d pid rc; d=$(_amq_dir)
  pid=$(pid_of "$d/activemq.pid")
  if alive "$pid" && _amq_handshake; then
    _amq_urls; return 0
  fi
  [ -n "$pid" ] && stop_pid "$d/activemq.pid" 5
  _amq_config
  # -Dactivemq.* point everything (config, data, classpath) into the private dir; the JVM runs
  # the broker in the foreground of its own process, which we own through the pid file.
  setsid java -Xms64M -Xmx256M -XX:+UseSerialGC \
    -Djava.io.tmpdir="$d/tmp" -Dactivemq.home=/usr/share/activemq -Dactivemq.base="$d" \
    -Dactivemq.conf="$d/conf" -Dactivemq.data="$d/data" -Dactivemq.classpath="$d/conf" \
    -Dlog4j.configuration="file:$d/conf/log4j.properties" \
    -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:$d/conf/activemq.xml" \
    >>"$d/stdout.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$d/activemq.pid"
  rc=0; wait_for 60 "$pid" _amq_handshake || rc=$?
  case $rc in
    0) ;;
    2) fail_with_log activemq "$d/activemq.log" "the broker exited during startup (see also $d/stdout.log)" ;;
    *) fail_with_log activemq "$d/activemq.log" "no STOMP CONNECTED on 127.0.0.1:$AMQ_STOMP_PORT within 60s" ;;
  esac
  _amq_urls
  log "activemq up (pid $pid, STOMP 127.0.0.1:$AMQ_STOMP_PORT, STOMP+TLS 127.0.0.1:$AMQ_STOMPS_PORT)"
}

_amq_urls() {
  local tls="$RUN/tls"
  add_url stomp-activemq "stomp://$AMQ_USER:$AMQ_PASS@127.0.0.1:$AMQ_STOMP_PORT/"
  add_url stomp+ssl-activemq \
    "stomp+ssl://$AMQ_USER:$AMQ_PASS@127.0.0.1:$AMQ_STOMPS_PORT/?cafile=$tls/ca.pem&certfile=$tls/client.pem&keyfile=$tls/client.key"
}

activemq_down() {
  stop_pid "$(_amq_dir)/activemq.pid" 10
  drop_urls stomp-activemq
  drop_urls stomp+ssl-activemq
  # a test broker starts each session empty (kill + up keeps the data: that is the fault test)
  rm -rf "$(_amq_dir)/data"
}

activemq_status() {
  local pid; pid=$(pid_of "$(_amq_dir)/activemq.pid")
  if alive "$pid" && _amq_handshake; then echo "activemq: up (pid $pid)"; else echo "activemq: down"; fi
}

activemq_kill() {
  local f pid; f="$(_amq_dir)/activemq.pid"; pid=$(pid_of "$f")
  if [ -n "$pid" ] && alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
  rm -f "$f"
}

activemq_pids() {
  local pid; pid=$(pid_of "$(_amq_dir)/activemq.pid")
  if alive "$pid"; then echo "$pid"; fi
}
