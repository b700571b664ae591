# Shared helper (not a broker): a private CA and a server certificate for 127.0.0.1.
# ensure_tls prints nothing and leaves, under $RUN/tls: ca.pem ca.key server.pem server.key
# client.pem client.key (signed by the CA; SAN DNS:localhost, IP:127.0.0.1).
ensure_tls() {
  local d="$RUN/tls"
  [ -f "$d/server.pem" ] && [ -f "$d/client.pem" ] && return 0
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=mqprimer test CA" \
      -keyout ca.key -out ca.pem >/dev/null 2>&1
    for who in server client; do
      openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$who.key" -out "$who.csr" >/dev/null 2>&1
      printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$who.ext" -out "$who.pem" >/dev/null 2>&1
    done
    chmod 644 ./*.key ./*.pem
  ) || die "could not create test TLS certificates with openssl"
}
