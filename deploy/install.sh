#!/usr/bin/env bash
# Install coinfer as a systemd service from this source tree.
#
#   sudo deploy/install.sh edge [--host edge.lan]...       # desktop: mosquitto (TLS, passwords, ACLs) + edged
#   sudo deploy/install.sh device [--id pi-1] [--broker edge.lan]   # a Raspberry Pi (64-bit OS) or any Linux device
#   sudo deploy/install.sh monitoring [--domain lan]       # desktop: Prometheus (+ Grafana where apt has it)
#
# Idempotent: existing configs, certificates and passwords are kept. Python wheels for every dependency exist
# for aarch64 (64-bit Raspberry Pi OS, Python 3.11+); 32-bit (armv7) Pi OS has no onnxruntime wheel.
# `make deploy-check` runs the README's deployment steps, this script included, in a scratch root.
set -euo pipefail

role=${1:-}
shift || true
hosts=() device_id="" broker_host="" domain="lan"
while [ $# -gt 0 ]; do
  case $1 in
    --host) hosts+=("$2"); shift 2 ;;
    --id) device_id=$2; shift 2 ;;
    --broker) broker_host=$2; shift 2 ;;
    --domain) domain=$2; shift 2 ;;
    *) echo "install.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case $role in edge|device|monitoring) ;;
  *) echo "usage: $0 edge [--host NAME]... | device [--id ID] [--broker HOST] | monitoring [--domain D]" >&2
     exit 2 ;;
esac
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/coinfer
etc=/etc/coinfer

# A name this host must resolve (else stop now, before installing anything, naming it and what to do).
must_resolve() {
  getent hosts "$1" >/dev/null || {
    echo "install.sh: '$1' does not resolve on this host ($2): add it to your DNS or /etc/hosts" \
         "(e.g. '192.168.1.10 $1')" >&2
    exit 2
  }
}
if [ "$role" = device ]; then
  if [ -z "$broker_host" ]; then  # the configured broker: an existing config's, else the example's
    conf="$etc/deviced.toml"; [ -e "$conf" ] || conf="$src/deploy/config/deviced.toml"
    broker_host=$(sed -n '/^\[broker\]/,$ s/^host *= *"\(.*\)".*/\1/p' "$conf" | head -1)
  fi
  must_resolve "$broker_host" "the broker, as named in its certificate (install.sh edge --host)"
fi
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 2; }

# Without systemd as PID 1 (a container, a chroot) the units cannot be started: say so, do the rest.
systemd_up() {
  local state
  state=$(systemctl is-system-running 2>/dev/null) || true  # "offline" (or nothing) without systemd as PID 1
  case $state in ""|offline|unknown) return 1 ;; *) return 0 ;; esac
}
restart() {
  if systemd_up; then systemctl restart "$1"; else
    echo "== systemd is not running here: start $1 yourself (its unit: /etc/systemd/system/$1.service)"; fi
}
# The system's own Python, never whatever `python3` is first on root's PATH: a pyenv or conda Python under a
# 0700 home cannot be executed by the units' DynamicUser.
python=/usr/bin/python3

apt() {
  echo "== system packages: $*"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

if [ "$role" = monitoring ]; then
  apt prometheus
  [ -x "$prefix/venv/bin/coinfer" ] || { echo "install.sh: install the edge first (install.sh edge)" >&2; exit 2; }
  edge_id=$(sed -n 's/^edge_id *= *"\(.*\)".*/\1/p' "$etc/edged.toml")
  for device in $("$prefix/venv/bin/coinfer" broker list | awk '$1 == "device" {print $2}'); do
    must_resolve "$device.$domain" "Prometheus scrapes device $device there on port 9102"
  done
  echo "== Prometheus: rules and a scrape config of the provisioned edges and devices (ID.$domain)"
  install -m 0644 "$src/deploy/prometheus/coinfer.rules.yml" /etc/prometheus/coinfer.rules.yml
  if [ -e /etc/prometheus/prometheus.yml ] && [ ! -e /etc/prometheus/prometheus.yml.orig ]; then
    cp /etc/prometheus/prometheus.yml /etc/prometheus/prometheus.yml.orig
    echo "== /etc/prometheus/prometheus.yml is replaced (Debian's default jobs go); the old one: prometheus.yml.orig"
  fi
  "$prefix/venv/bin/coinfer" broker scrape-config --domain "$domain" --target "$edge_id=127.0.0.1:9101" \
    --out /etc/prometheus/prometheus.yml
  promtool check config /etc/prometheus/prometheus.yml
  restart prometheus
  if apt-cache show grafana >/dev/null 2>&1; then
    apt grafana
    install -d /etc/grafana/provisioning/datasources /etc/grafana/provisioning/dashboards \
      /var/lib/grafana/dashboards/coinfer
    install -m 0644 "$src/deploy/grafana/provisioning/datasources/coinfer.yml" /etc/grafana/provisioning/datasources/
    install -m 0644 "$src/deploy/grafana/provisioning/dashboards/coinfer.yml" /etc/grafana/provisioning/dashboards/
    install -m 0644 "$src"/deploy/grafana/dashboards/*.json /var/lib/grafana/dashboards/coinfer/
    restart grafana-server
    echo "== monitoring: Prometheus on :9090, Grafana on :3000 (dashboards: coinfer devices, coinfer edges)"
  else
    echo "== monitoring: Prometheus on :9090. Grafana is not in this system's apt sources: add Grafana's own"
    echo "   apt repository, install grafana, then copy deploy/grafana/ as the README's Deployment table says."
  fi
  exit 0
fi

daemon=$([ "$role" = edge ] && echo edged || echo deviced)
pkgs=(python3-venv python3-pip)
[ "$role" = edge ] && pkgs+=(mosquitto mosquitto-clients openssl)
apt "${pkgs[@]}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  { echo "install.sh: coinfer needs Python 3.11 or later as $python" >&2; exit 2; }

echo "== coinfer into $prefix/venv (with $python)"
[ -x "$prefix/venv/bin/python" ] || "$python" -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --upgrade pip
"$prefix/venv/bin/pip" install -q "$src"
# on root's PATH and in sudo's secure_path (`sudo coinfer broker ...`)
install -d /usr/local/bin
for tool in coinfer edged deviced; do ln -sfn "$prefix/venv/bin/$tool" "/usr/local/bin/$tool"; done

echo "== config in $etc"
install -d -m 0755 "$etc"
if [ ! -e "$etc/$daemon.toml" ]; then
  install -m 0644 "$src/deploy/config/$daemon.toml" "$etc/$daemon.toml"
  if [ -n "$device_id" ]; then
    sed -i "s/^device_id = \"[^\"]*\"/device_id = \"$device_id\"/; s/^username = \"[^\"]*\"/username = \"$device_id\"/" \
      "$etc/$daemon.toml"
  fi
  if [ -n "$broker_host" ]; then
    sed -i "s/^host = \"[^\"]*\"/host = \"$broker_host\"/" "$etc/$daemon.toml"
  fi
fi
# each daemon its own credential file, so that an edge and a device can share one host
if [ -e "$etc/mqtt-password" ] && [ ! -e "$etc/$daemon.password" ]; then
  mv "$etc/mqtt-password" "$etc/$daemon.password"
fi
install -m 0644 "$src/deploy/systemd/$daemon.service" /etc/systemd/system/

if [ "$role" = edge ]; then
  echo "== broker: TLS listener 8883, loopback 1883, passwords and ACLs"
  [ ${#hosts[@]} -gt 0 ] || hosts=("$(hostname -f)")
  if [ ! -e /etc/mosquitto/coinfer/ca.crt ]; then
    args=(); for h in "${hosts[@]}"; do args+=(--host "$h"); done
    coinfer broker init --dir /etc/mosquitto/coinfer "${args[@]}"
  fi
  install -m 0644 "$src/deploy/mosquitto/coinfer.conf" /etc/mosquitto/conf.d/coinfer.conf
  edge_id=$(sed -n 's/^edge_id *= *"\(.*\)".*/\1/p' "$etc/edged.toml")
  if ! coinfer broker list | grep -q " $edge_id "; then
    coinfer broker add-edge "$edge_id" >/dev/null
    install -m 0600 "/etc/mosquitto/coinfer/secrets/$edge_id.password" "$etc/edged.password"
    rm "/etc/mosquitto/coinfer/secrets/$edge_id.password"
  fi
  restart mosquitto
fi

if systemd_up; then
  systemctl daemon-reload
  systemctl enable "$daemon.service"
fi
if [ -s "$etc/$daemon.password" ]; then
  restart "$daemon"
  echo "== $daemon: systemctl status $daemon; journalctl -u $daemon -f"
else
  cat <<EOF
== $daemon installed, not started: it needs its broker password and the broker's CA.
On the edge server:  sudo coinfer broker add-device <device_id>
Copy /etc/mosquitto/coinfer/secrets/<device_id>.password from there to $etc/$daemon.password (mode 0600), and
/etc/mosquitto/coinfer/ca.crt to $etc/ca.crt; device_id and [broker] host are in $etc/deviced.toml; then
  sudo systemctl start deviced
EOF
fi
