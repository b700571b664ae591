# make_venv PYTHON: create .venv; on Debian/Ubuntu the stdlib venv module needs the
# python3-venv package (ensurepip is split out), installed here when running as root.
make_venv() {
  local py="$1"
  [ -x .venv/bin/python ] && return 0
  if "$py" -m venv .venv 2>/dev/null; then return 0; fi
  rm -rf .venv
  local pkg="python3-venv"
  local ver; ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $pkg (needed by '$py -m venv')" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >&2 \
      || { [ -n "$ver" ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >&2; }
    "$py" -m venv .venv && return 0
  fi
  echo "cannot create a virtual environment with $py: install python3-venv (sudo apt-get install python3-venv)" >&2
  return 1
}
