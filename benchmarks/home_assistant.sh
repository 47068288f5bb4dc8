#!/usr/bin/env bash
# The appliance against a real Home Assistant (not in CI: minutes, root, ~1.5 GB of disk).
#   sudo benchmarks/home_assistant.sh [WORKDIR]      (default var/home-assistant; PY= a host python with the device)
# Steps (../shared/DATA.md "A real Home Assistant, offline"): a Debian trixie root (Python 3.13) made with
# mmdebstrap, Home Assistant 2026.2.3 in a venv there, started on 127.0.0.1, onboarded and given the MQTT
# integration through its REST API; a Mosquitto and a `serve` (a folder camera: three catalog prints and one
# unknown photo, the trigger on, MQTT on) on this machine. benchmarks/home_assistant_check.py then reads what Home
# Assistant made of the device: its entities, how soon the camera is "on" after a start, state changes per lookup,
# "no match", the "Look up now" button, and the attributes after a Home Assistant restart.
# Writes WORKDIR/report.json and prints it. A second run reuses the root and its Home Assistant (~1.5 min).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(realpath -m "${1:-$REPO/var/home-assistant}")
ROOT=$WORK/root
PY=${PY:-python3}
HA_VERSION=${HA_VERSION:-2026.2.3}
HA_PORT=${HA_PORT:-18123}
mkdir -p "$WORK"
PIDS=()
MOUNTS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" || true; done
}
trap cleanup EXIT
bind() {  # bind HOST_PATH [ROOT_PATH]: mounted read-only unless it is one of the kernel's
  local target=$ROOT${2:-$1}
  mkdir -p "$target"
  mountpoint -q "$target" || { mount --bind "$1" "$target" && MOUNTS+=("$target"); }
}
# uv (which Home Assistant installs an integration's requirements with) trusts this machine's CAs only natively
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/ha/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
         LANG=C.UTF-8 TZ=UTC SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt UV_NATIVE_TLS=1)
in_root() { "${IN_ROOT[@]}" "$@"; }
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

command -v mmdebstrap >/dev/null || apt-get install -y -qq mmdebstrap
command -v mosquitto >/dev/null || apt-get install -y -qq mosquitto
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  echo "== the Debian trixie root (a few minutes)" >&2
  if findmnt -rno TARGET | grep -q "^$ROOT/"; then echo "$ROOT has mounts left: unmount them first" >&2; exit 1; fi
  rm -rf "$ROOT"  # what a failed mmdebstrap left (it wants an empty target)
  MIRROR=$(grep -hE '^\s*(URIs:|deb )' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
           | grep -oE 'https?://[^ ]+/debian/?' | head -1 || true)  # the mirror apt uses here
  mmdebstrap --variant=minbase --include=python3,python3-venv,python3-dev,build-essential,ca-certificates \
    trixie "$ROOT" "${MIRROR:-http://deb.debian.org/debian}"
fi
# pip inside the root: DNS, this machine's CAs (the bundle file alone is not enough), its pip index settings
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
in_root update-ca-certificates >/dev/null 2>&1 || true
{ printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n'
  for f in /etc/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [ -f "$f" ] && grep -E '^\s*(index-url|extra-index-url|find-links|trusted-host)\s*=' "$f" || true
  done
  [ -n "${PIP_INDEX_URL:-}" ] && echo "index-url = $PIP_INDEX_URL"
  [ -n "${PIP_FIND_LINKS:-}" ] && echo "find-links = $PIP_FIND_LINKS"
} | awk -F' *= *' '!seen[$1]++' > "$ROOT/etc/pip.conf"  # pip refuses a key twice: the first one wins
for d in $(grep -ohE 'file://[^ ]+|/opt/[^ ]+' "$ROOT/etc/pip.conf" | sed -E 's#^file://##; s#^(/[^/]+/[^/]+).*#\1#' \
           | sort -u); do  # a local index's files lie beside its simple/ folder
  [ -d "$d" ] && bind "$d"
done
for d in /proc /dev /sys; do bind "$d"; done

if [ ! -x "$ROOT/opt/ha/bin/hass" ]; then
  echo "== Home Assistant $HA_VERSION in the root (a few minutes)" >&2
  in_root python3 -m venv /opt/ha
  in_root /opt/ha/bin/pip install -q "homeassistant==$HA_VERSION" paho-mqtt==2.1.0
fi

# a fresh Home Assistant configuration each run
rm -rf "$ROOT/config" && mkdir -p "$ROOT/config"
cat > "$ROOT/config/configuration.yaml" <<EOF
homeassistant:
  name: bench
  latitude: 0
  longitude: 0
  elevation: 0
  unit_system: metric
  time_zone: UTC
http:
  server_host: 127.0.0.1
  server_port: $HA_PORT
api:
config:
onboarding:
websocket_api:
history:
logger:
  default: warning
  logs:
    homeassistant.components.mqtt: debug
EOF
start_ha() {
  "${IN_ROOT[@]}" /opt/ha/bin/hass -c /config --log-file /config/home-assistant.log >>"$WORK/hass.out" 2>&1 &
  HA_PID=$!
  PIDS+=("$HA_PID")
}

# the broker and the appliance's data on this machine (the root shares its network)
BROKER_PORT=$(free_port)
WEB_PORT=$(free_port)
mkdir -p "$WORK/broker" && printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$BROKER_PORT" \
  > "$WORK/broker/mosquitto.conf"
mosquitto -c "$WORK/broker/mosquitto.conf" >"$WORK/broker/mosquitto.log" 2>&1 &
PIDS+=($!)
rm -rf "$WORK/device" && mkdir -p "$WORK/device/catalog" "$WORK/device/views"
(cd "$REPO" && PYTHONPATH=$REPO "$PY" - "$WORK/device" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.shipped_photos import shipped_photos
from edge_retrieval.imaging.synthetic_views import camera_view

out, photos = Path(sys.argv[1]), shipped_photos()
for i, name in enumerate(("rocket", "coffee", "moon", "coins")):  # coffee: not in the catalog
    if name != "coffee":
        (out / "catalog" / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 90))
    view = camera_view(photos[name], "closeup", np.random.default_rng(i))
    (out / "views" / f"{i}_{name}.jpg").write_bytes(encode_jpeg(view, 90))
EOF
)
cat > "$WORK/device/config.yaml" <<EOF
camera: {source: views, fps: 5, hold_s: 3}
catalog: {build_from: catalog}
web: {host: 127.0.0.1, port: $WEB_PORT}
log_level: INFO
mqtt: {enabled: true, host: 127.0.0.1, port: $BROKER_PORT, device_id: bench, device_name: HA bench, keepalive_s: 10}
EOF

echo "== Home Assistant: start, onboarding, the MQTT integration" >&2
start_ha
cp "$REPO/benchmarks/home_assistant_check.py" "$ROOT/config/check.py"
CHECK=(in_root /opt/ha/bin/python /config/check.py --ha "http://127.0.0.1:$HA_PORT" --state /config/check.json)
"${CHECK[@]}" setup --broker-port "$BROKER_PORT"

echo "== the appliance starts while Home Assistant watches" >&2
date -u +%s.%N > "$WORK/serve_started"
(cd "$WORK/device" && PYTHONPATH=$REPO exec "$PY" -m edge_retrieval serve --config config.yaml) \
  >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!
PIDS+=("$SERVE_PID")
"${CHECK[@]}" watch --device "http://127.0.0.1:$WEB_PORT" --serve-started "$(cat "$WORK/serve_started")" \
  --streaming-at "$(cd "$WORK" && "$PY" - <<'EOF'
import datetime, re, time
for _ in range(600):  # the device's own log line: "camera views: streaming"
    m = re.search(r"^(\S+ \S+),(\d+) INFO \S+: camera \S+: streaming", open("serve.log").read(), re.M)
    if m:
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.timezone.utc)
        print(t.timestamp() + int(m.group(2)) / 1000)
        break
    time.sleep(0.1)
EOF
)"

echo "== Home Assistant restarts: are the attributes back?" >&2
kill "$HA_PID" && wait "$HA_PID" 2>/dev/null || true
start_ha
"${CHECK[@]}" restarted
cp "$ROOT/config/check.json" "$WORK/report.json"
grep -E "ERROR|WARNING.*mqtt" "$ROOT/config/home-assistant.log" | head -20 > "$WORK/ha_warnings.txt" || true
cat "$WORK/report.json"
