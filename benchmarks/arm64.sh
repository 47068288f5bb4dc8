#!/usr/bin/env bash
# The README's Raspberry Pi install, proven on a Debian bookworm arm64 root under QEMU (not in CI: ~10 min).
#   sudo benchmarks/arm64.sh [WORKDIR]          (default var/arm64; PY= a host python with the device installed)
# Steps (../shared/DATA.md "An arm64 root under QEMU"): mmdebstrap the root, copy the project in, follow the
# README (venv, pip install -e .), index build + query --json of a few real photos and camera views, the same
# on this machine, then compare descriptors (cosine) and answers; also tries the tflite-runtime-only path.
# Writes WORKDIR/report.json and prints it. Needs root, network to Debian and PyPI. KEEP_VENV=1: reuse the venvs.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(realpath -m "${1:-$REPO/var/arm64}")
ROOT=$WORK/root
PY=${PY:-python3}
APP=/opt/edge-retrieval
mkdir -p "$WORK"
declare -A SECONDS_OF
step() {  # step NAME CMD... : run, time, remember the seconds
  local name=$1; shift
  local t0=$(date +%s) rc=0
  echo "== $name" >&2
  "$@" || rc=$?
  SECONDS_OF[$name]=$(( $(date +%s) - t0 ))
  return $rc
}
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 bash -c "set -o pipefail; $*"; }

command -v mmdebstrap >/dev/null && command -v qemu-aarch64-static >/dev/null \
  || apt-get install -y -qq qemu-user-static mmdebstrap
# No systemd here registers the binfmt handler: do it by hand (idempotent).
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  # README's apt line (python3-venv python3-dev build-essential; git is not needed: the project is copied in)
  step debootstrap mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-dev,build-essential \
    bookworm "$ROOT" http://deb.debian.org/debian
fi
# pip inside the root needs DNS and the CA bundle
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"
# not /sys: XNNPACK's cpuinfo then reads the x86 host's CPU topology and segfaults under QEMU (its
# "Error in cpuinfo" lines without /sys are harmless)
for fs in proc dev; do mountpoint -q "$ROOT/$fs" || mount --bind "/$fs" "$ROOT/$fs"; done
trap 'umount "$ROOT/proc" "$ROOT/dev" 2>/dev/null || true' EXIT

# The project as a clone would have it (tracked + new files, no var/ or venvs)
# KEEP_VENV=1 keeps the venvs of a previous run (a rerun after changing this script; pip then finds all installed)
if [ "${KEEP_VENV:-0}" = 1 ]; then
  find "$ROOT$APP" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
else
  rm -rf "$ROOT$APP" "$ROOT/opt/tfl"
fi
mkdir -p "$ROOT$APP"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$ROOT$APP"

# A small catalog of real photos and camera views of them (fixed seeds), made once on this machine
DATA=$WORK/data
rm -rf "$DATA" && mkdir -p "$DATA/catalog" "$DATA/views"
(cd "$REPO" && PYTHONPATH=$REPO "$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.shipped_photos import shipped_photos
from edge_retrieval.imaging.synthetic_views import camera_view
out = Path(sys.argv[1]); photos = shipped_photos()
names = ["astronaut", "chelsea", "rocket", "coins", "camera", "china", "flower", "brick"]
for n in names:
    (out / "catalog" / f"{n}.jpg").write_bytes(encode_jpeg(photos[n], 92))
for i, (n, kind) in enumerate(zip(names[:6], ["closeup", "perspective", "lighting", "rotate", "table", "blur"])):
    (out / "views" / f"{n}-{kind}.jpg").write_bytes(encode_jpeg(camera_view(photos[n], kind, np.random.default_rng(i)), 90))
(out / "views" / "coffee-notincatalog.jpg").write_bytes(encode_jpeg(camera_view(photos["coffee"], "closeup", np.random.default_rng(9)), 90))
PYEOF
)
rm -rf "$ROOT/data" && cp -r "$DATA" "$ROOT/data"

# README: python3 -m venv .venv && .venv/bin/pip install -e .
step pip_install in_root "cd $APP && python3 -m venv .venv && .venv/bin/pip install -q -e . 2>&1 | tail -5"
in_root "$APP/.venv/bin/pip list 2>/dev/null | grep -i -E '^(numpy|opencv-python-headless|ai-edge-litert|annoy|paho-mqtt) '" > "$WORK/arm_pip.txt"
step index_build in_root "cd $APP && .venv/bin/python -m edge_retrieval index build --config config.yaml --catalog /data/catalog --out /data/index"
step query in_root "cd $APP && .venv/bin/python -m edge_retrieval query --config config.yaml --index /data/index --json /data/views/*.jpg > /data/arm_query.jsonl"
# README, as the service user: the state directory must exist before the first index build
step service_user in_root "command -v useradd >/dev/null || apt-get install -y -qq passwd >/dev/null; \
  id edge-retrieval >/dev/null 2>&1 || useradd --system --home $APP --groups video edge-retrieval; \
  mkdir -p /etc/edge-retrieval && sed -e 's#^  demo: true#  demo: false#' -e 's#^  source: demo#  source: /dev/video0#' \
    -e 's#^  path: var/catalog#  path: /var/lib/edge-retrieval/catalog#' \
    -e 's#^  enrolled_dir: var/enrolled#  enrolled_dir: /var/lib/edge-retrieval/enrolled#' \
    -e 's#^  store: var/catalog.sqlite#  store: /var/lib/edge-retrieval/catalog.sqlite#' \
    $APP/config.yaml > /etc/edge-retrieval/config.yaml; \
  rm -rf /var/lib/edge-retrieval && install -d -o edge-retrieval -g edge-retrieval /var/lib/edge-retrieval; \
  cd $APP && runuser -u edge-retrieval -- .venv/bin/python -m edge_retrieval index build --catalog /data/catalog \
    --config /etc/edge-retrieval/config.yaml"
step descriptors in_root "cd $APP && .venv/bin/python -m benchmarks.descriptors encode /data/arm.npz /data/catalog/*.jpg /data/views/*.jpg"

# tflite-runtime only (numpy<2, Python <= 3.11): only wheels, never a source build of numpy/opencv under QEMU
TFL=fail
if step tflite_install in_root "cd $APP && python3 -m venv /opt/tfl && /opt/tfl/bin/pip install -q \
     --only-binary numpy,opencv-python-headless,tflite-runtime,pillow,pydantic-core \
     'numpy<2' tflite-runtime 'opencv-python-headless<4.11' pillow annoy==1.17.3 flask waitress pyyaml pydantic tqdm \
     && /opt/tfl/bin/pip install -q --no-deps -e . 2>&1 | tail -5" \
   && in_root "cd $APP && /opt/tfl/bin/python -m benchmarks.descriptors encode /data/tfl.npz /data/catalog/*.jpg /data/views/*.jpg" \
   && in_root "/opt/tfl/bin/pip list 2>/dev/null | grep -i -E '^(numpy|opencv|tflite)'" > "$WORK/tfl_pip.txt"; then
  TFL=ok
fi

# The same on this machine
(cd "$REPO" && PYTHONPATH=$REPO "$PY" -m edge_retrieval index build --config config.yaml --catalog "$DATA/catalog" --out "$DATA/x86-index" \
  && PYTHONPATH=$REPO "$PY" -m edge_retrieval query --config config.yaml --index "$DATA/x86-index" --json "$DATA"/views/*.jpg > "$DATA/x86_query.jsonl" \
  && PYTHONPATH=$REPO "$PY" -m benchmarks.descriptors encode "$DATA/x86.npz" "$DATA"/catalog/*.jpg "$DATA"/views/*.jpg >/dev/null) || true
# An index built on x86 and shipped to the arm64 device (the fleet case): query it there
cp -r "$DATA/x86-index" "$ROOT/data/x86-index"
in_root "cd $APP && .venv/bin/python -m edge_retrieval query --config config.yaml --index /data/x86-index --json /data/views/*.jpg \
  > /data/arm_on_x86_index.jsonl" || true
cp "$ROOT/data/arm_query.jsonl" "$ROOT/data/arm_on_x86_index.jsonl" "$ROOT/data/arm.npz" "$DATA/"
[ "$TFL" = ok ] && cp "$ROOT/data/tfl.npz" "$DATA/"

(cd "$REPO" && PYTHONPATH=$REPO "$PY" - "$WORK" "$TFL" "$(declare -p SECONDS_OF)" <<'PYEOF'
import json, subprocess, sys
from pathlib import Path
work, tfl, secs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
data = work / "data"
def compare(a, b):
    out = subprocess.run([sys.executable, "-m", "benchmarks.descriptors", "compare", str(a), str(b)], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr.strip()[-300:]}
def answers(p):
    return {json.loads(l)["query"].split("/")[-1]: json.loads(l) for l in p.read_text().splitlines() if l.strip()}
arm, x86 = answers(data / "arm_query.jsonl"), answers(data / "x86_query.jsonl")
shipped = answers(data / "arm_on_x86_index.jsonl")
rows = {q: {"arm_match": (arm[q].get("match") or {}).get("id"), "x86_match": (x86.get(q, {}).get("match") or {}).get("id"),
            "arm_top": arm[q]["results"][0]["id"], "x86_top": x86.get(q, {}).get("results", [{}])[0].get("id"),
            "arm_on_x86_index_match": (shipped.get(q, {}).get("match") or {}).get("id"),
            "arm_ms": arm[q]["timings_ms"]["total"], "x86_ms": x86.get(q, {}).get("timings_ms", {}).get("total")} for q in arm}
secs = dict(kv.split("]=", 1) for kv in secs[secs.index("(") + 1:secs.rindex(")")].replace("[", "").replace('"', "").split())
report = {"seconds": {k: int(v) for k, v in secs.items()},
          "arm_packages": (work / "arm_pip.txt").read_text().split("\n"),
          "arm_vs_x86_descriptors": compare(data / "arm.npz", data / "x86.npz"),
          "queries": rows,
          "same_decisions": sum(r["arm_match"] == r["x86_match"] for r in rows.values()), "n_queries": len(rows),
          "same_decisions_on_the_shipped_x86_index": sum(r["arm_on_x86_index_match"] == r["x86_match"] for r in rows.values()),
          "tflite_runtime_path": tfl}
if tfl == "ok":
    report["tflite_packages"] = (work / "tfl_pip.txt").read_text().split("\n")
    report["tflite_vs_x86_descriptors"] = compare(data / "tfl.npz", data / "x86.npz")
    report["tflite_vs_arm_litert_descriptors"] = compare(data / "tfl.npz", data / "arm.npz")
(work / "report.json").write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PYEOF
)
