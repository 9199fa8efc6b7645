#!/bin/sh
# OpenSMC agent installer, served by the OpenSMC server at /agent/install.sh (docs/agent.md).
#
#   curl -fsSL @SERVER@/agent/install.sh | sudo sh -s -- --token-id at-... --token-code ...
#   wget -qO- @SERVER@/agent/install.sh | sudo sh -s -- --token-id at-... --token-code ...
#
# Downloads the agent (one zipapp, Python 3.6+ with the standard library only) from this
# server, checks its SHA-256, installs it under /opt/opensmc-agent and starts it: as the
# systemd unit opensmc-agent.service where systemd runs, in the background otherwise.
# Running it again upgrades in place (the registration is kept); --uninstall removes
# everything it installed. Options:
#   --token-id ID --token-code CODE   the activation code (CreateAccessToken)
#   --server URL                      another address of the server (default: @SERVER@)
#   --ca-cert FILE                    PEM CA bundle for an https:// server with a private CA
#   --disk PATH                       a disk image or block device to migrate instead of the
#                                     discovered disks (repeatable; the first is the system disk)
#   --uninstall                       stop the agent and remove everything this script installed
set -eu

SERVER='@SERVER@'
VERSION='@VERSION@'
ROOT=/opt/opensmc-agent
UNIT=/etc/systemd/system/opensmc-agent.service
TOKEN_ID=
TOKEN_CODE=
CA_CERT=
DISKS=
UNINSTALL=

die() { echo "opensmc-agent install: error: $*" >&2; exit 1; }
say() { echo "opensmc-agent install: $*"; }
word() {  # a value that goes into the env file and the command line unquoted: no blanks, no quotes
  case "$2" in
    '' | *[!A-Za-z0-9._:/@%+=,-]*) die "$1 must be letters, digits and ._:/@%+=,- only (got '$2')" ;;
  esac
}

while [ $# -gt 0 ]; do
  case "$1" in
    --token-id) [ $# -ge 2 ] || die "--token-id needs a value"; TOKEN_ID=$2; shift 2 ;;
    --token-code) [ $# -ge 2 ] || die "--token-code needs a value"; TOKEN_CODE=$2; shift 2 ;;
    --server) [ $# -ge 2 ] || die "--server needs a value"; SERVER=$2; shift 2 ;;
    --ca-cert) [ $# -ge 2 ] || die "--ca-cert needs a value"; CA_CERT=$2; shift 2 ;;
    --disk) [ $# -ge 2 ] || die "--disk needs a value"; word --disk "$2"; DISKS="${DISKS:+$DISKS }$2"; shift 2 ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h | --help) sed -n '2,18p' "$0" 2>/dev/null || true; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run me as root (sudo sh -s -- ...): the agent reads whole disks"

has_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }

stop_agent() {
  if has_systemd && [ -f "$UNIT" ]; then
    systemctl stop opensmc-agent.service 2>/dev/null || true
  fi
  if [ -f "$ROOT/agent.pid" ]; then
    pid=$(cat "$ROOT/agent.pid")
    # only our own agent: its command line names the zipapp
    if [ -n "$pid" ] && grep -q opensmc-agent.pyz "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      n=0
      while kill -0 "$pid" 2>/dev/null && [ $n -lt 10 ]; do sleep 1; n=$((n + 1)); done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$ROOT/agent.pid"
  fi
}

if [ -n "$UNINSTALL" ]; then
  stop_agent
  if [ -f "$UNIT" ]; then
    if has_systemd; then systemctl disable opensmc-agent.service 2>/dev/null || true; fi
    rm -f "$UNIT"
    if has_systemd; then systemctl daemon-reload || true; fi
  fi
  rm -rf "$ROOT"
  say "removed the agent, its registration state and its log ($ROOT)"
  exit 0
fi

PYTHON=$(command -v python3 2>/dev/null) || die "python3 not found: install Python 3.6 or newer (e.g. yum install python3, apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 6) else 1)' \
  || die "$PYTHON is Python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); the agent needs 3.6 or newer"

case "$SERVER" in http://* | https://*) ;; *) die "--server must be an http:// or https:// URL" ;; esac
word --server "$SERVER"
if [ -n "$CA_CERT" ]; then
  word --ca-cert "$CA_CERT"
  [ -r "$CA_CERT" ] || die "--ca-cert $CA_CERT: no such readable file"
fi

if command -v curl >/dev/null 2>&1; then
  fetch() { if [ -n "$CA_CERT" ]; then curl -fsSL --cacert "$CA_CERT" "$1"; else curl -fsSL "$1"; fi; }
elif command -v wget >/dev/null 2>&1; then
  fetch() { if [ -n "$CA_CERT" ]; then wget -qO- --ca-certificate="$CA_CERT" "$1"; else wget -qO- "$1"; fi; }
else
  die "neither curl nor wget is installed"
fi

mkdir -p "$ROOT"
chmod 0755 "$ROOT"
umask 077
fetch "$SERVER/agent/opensmc-agent.pyz.sha256" > "$ROOT/opensmc-agent.pyz.sha256" \
  || die "cannot download $SERVER/agent/opensmc-agent.pyz.sha256"
fetch "$SERVER/agent/opensmc-agent.pyz" > "$ROOT/opensmc-agent.pyz.new" \
  || die "cannot download $SERVER/agent/opensmc-agent.pyz"
want=$(cut -d ' ' -f 1 "$ROOT/opensmc-agent.pyz.sha256")
if command -v sha256sum >/dev/null 2>&1; then
  got=$(sha256sum "$ROOT/opensmc-agent.pyz.new" | cut -d ' ' -f 1)
else
  got=$("$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$ROOT/opensmc-agent.pyz.new")
fi
if [ "$got" != "$want" ]; then
  rm -f "$ROOT/opensmc-agent.pyz.new"
  die "the downloaded agent's SHA-256 is $got, the server publishes $want: not installed"
fi
chmod 0755 "$ROOT/opensmc-agent.pyz.new"

# The activation code: kept from the last run when none is given (an upgrade).
if [ -f "$ROOT/agent.env" ]; then
  old_id=$(sed -n "s/^OPENSMC_TOKEN_ID='\(.*\)'\$/\1/p" "$ROOT/agent.env")
  old_code=$(sed -n "s/^OPENSMC_TOKEN_CODE='\(.*\)'\$/\1/p" "$ROOT/agent.env")
  [ -n "$TOKEN_ID" ] || TOKEN_ID=$old_id
  [ -n "$TOKEN_CODE" ] || TOKEN_CODE=$old_code
  if [ -z "$DISKS" ]; then DISKS=$(sed -n "s/^OPENSMC_AGENT_DISKS='\(.*\)'\$/\1/p" "$ROOT/agent.env"); fi
fi
if [ -z "$TOKEN_ID" ] && [ ! -f "$ROOT/state/agent.json" ]; then
  rm -f "$ROOT/opensmc-agent.pyz.new"
  die "give --token-id and --token-code (an activation code from CreateAccessToken)"
fi
[ -z "$TOKEN_ID" ] || word --token-id "$TOKEN_ID"
[ -z "$TOKEN_CODE" ] || word --token-code "$TOKEN_CODE"

stop_agent
mv -f "$ROOT/opensmc-agent.pyz.new" "$ROOT/opensmc-agent.pyz"
mkdir -p "$ROOT/state"
chmod 0700 "$ROOT/state"
# Every value passed word() (no quotes, no blanks but between disks): safe in single quotes,
# for this shell (run.sh sources the file) and for systemd's EnvironmentFile= alike.
cat > "$ROOT/agent.env" <<EOF
OPENSMC_TOKEN_ID='$TOKEN_ID'
OPENSMC_TOKEN_CODE='$TOKEN_CODE'
OPENSMC_SERVER='$SERVER'
OPENSMC_CA_CERT='$CA_CERT'
OPENSMC_AGENT_DISKS='$DISKS'
OPENSMC_PYTHON='$PYTHON'
EOF
chmod 0600 "$ROOT/agent.env"
cat > "$ROOT/run.sh" <<'EOF'
#!/bin/sh
# Starts the OpenSMC agent with the settings of agent.env (written by install.sh).
set -eu
set -a
. /opt/opensmc-agent/agent.env
set +a
set -- --server "$OPENSMC_SERVER" --state-dir /opt/opensmc-agent/state
for d in $OPENSMC_AGENT_DISKS; do set -- "$@" --disk "$d"; done
if [ -n "$OPENSMC_CA_CERT" ]; then set -- "$@" --ca-cert "$OPENSMC_CA_CERT"; fi
exec "$OPENSMC_PYTHON" /opt/opensmc-agent/opensmc-agent.pyz "$@"
EOF
chmod 0755 "$ROOT/run.sh"

if has_systemd; then
  cat > "$UNIT" <<EOF
# Written by the OpenSMC agent installer ($SERVER/agent/install.sh); remove with --uninstall.
[Unit]
Description=OpenSMC migration agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$ROOT/run.sh
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
  systemctl daemon-reload
  systemctl enable opensmc-agent.service >/dev/null 2>&1
  systemctl restart opensmc-agent.service
  say "agent $VERSION installed in $ROOT and started as opensmc-agent.service"
  say "log: journalctl -u opensmc-agent.service -f"
else
  # No systemd: a plain background process; it is not restarted after a reboot.
  nohup "$ROOT/run.sh" >> "$ROOT/agent.log" 2>&1 < /dev/null &
  echo $! > "$ROOT/agent.pid"
  say "agent $VERSION installed in $ROOT and started in the background (pid $(cat "$ROOT/agent.pid"); no systemd here, so it does not start again after a reboot: run this command again then)"
  say "log: $ROOT/agent.log"
fi
