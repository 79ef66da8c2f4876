#!/usr/bin/env bash
# Install coinfer as a systemd service from this source tree.
#
#   sudo deploy/install.sh edge   [--host edge.lan]...  # desktop: mosquitto (TLS, passwords, ACLs) + edged
#   sudo deploy/install.sh device                       # Raspberry Pi (64-bit OS) or any Linux device: deviced
#
# Idempotent: existing configs, certificates and passwords are kept. Python wheels for every dependency exist
# for aarch64 (64-bit Raspberry Pi OS, Python 3.11+); 32-bit (armv7) Pi OS has no onnxruntime wheel.
set -euo pipefail

role=${1:-}
shift || true
hosts=()
while [ $# -gt 0 ]; do
  case $1 in
    --host) hosts+=("$2"); shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $role in edge|device) ;; *) echo "usage: $0 edge [--host NAME]... | device" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "run as root (sudo)" >&2; exit 2; }

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/coinfer
etc=/etc/coinfer
daemon=$([ "$role" = edge ] && echo edged || echo deviced)

echo "== system packages"
pkgs="python3-venv python3-pip"
[ "$role" = edge ] && pkgs="$pkgs mosquitto openssl"
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pkgs

echo "== coinfer into $prefix/venv"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$src"

echo "== config in $etc"
install -d -m 0755 "$etc"
[ -e "$etc/$daemon.toml" ] || install -m 0644 "$src/deploy/config/$daemon.toml" "$etc/$daemon.toml"
install -m 0644 "$src/deploy/systemd/$daemon.service" /etc/systemd/system/

if [ "$role" = edge ]; then
  echo "== broker: TLS listener 8883, loopback 1883, passwords and ACLs"
  [ ${#hosts[@]} -gt 0 ] || hosts=("$(hostname -f)")
  if [ ! -e /etc/mosquitto/coinfer/ca.crt ]; then
    args=(); for h in "${hosts[@]}"; do args+=(--host "$h"); done
    "$prefix/venv/bin/coinfer" broker init --dir /etc/mosquitto/coinfer "${args[@]}"
  fi
  install -m 0644 "$src/deploy/mosquitto/coinfer.conf" /etc/mosquitto/conf.d/coinfer.conf
  edge_id=$(sed -n 's/^edge_id *= *"\(.*\)".*/\1/p' "$etc/edged.toml")
  if ! "$prefix/venv/bin/coinfer" broker list | grep -q " $edge_id "; then
    "$prefix/venv/bin/coinfer" broker add-edge "$edge_id"
    install -m 0600 "/etc/mosquitto/coinfer/secrets/$edge_id.password" "$etc/mqtt-password"
    rm "/etc/mosquitto/coinfer/secrets/$edge_id.password"
  fi
  systemctl restart mosquitto
fi

systemctl daemon-reload
systemctl enable "$daemon.service"
if [ -s "$etc/mqtt-password" ]; then
  systemctl restart "$daemon.service"
  echo "== $daemon started: systemctl status $daemon; journalctl -u $daemon -f"
else
  cat <<EOF
== $daemon installed but not started: it needs its broker password.
On the edge server:  coinfer broker add-device <device_id>
Copy the printed password file here as $etc/mqtt-password (mode 0600) and the broker's
/etc/mosquitto/coinfer/ca.crt as $etc/ca.crt; set device_id and [broker] host in $etc/deviced.toml; then
  systemctl start deviced
EOF
fi
