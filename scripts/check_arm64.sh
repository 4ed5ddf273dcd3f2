#!/usr/bin/env bash
# The device client on arm64 (a Raspberry Pi's CPU), emulated: a maintainer's check, not CI.
#
#   sudo scripts/check_arm64.sh [OUTPUT]      (Debian or Ubuntu host, root, network to PyPI)
#
# Builds a Debian bookworm arm64 root with debootstrap and qemu-user-static, installs the
# client there with pip (the wheel built here from this checkout, its base dependencies
# from PyPI's aarch64 wheels: no torch), starts a coordinator on this host (127.0.0.1,
# level e only, one round) and runs one device at level e inside the arm64 root against
# it over loopback. Prints the client's install size, the device's training step time
# under emulation and the round; OUTPUT (default bench/results/arm64.txt) gets a copy.
#
# Environment: ROOT (the arm64 root, kept between runs; default /var/tmp/heterofl-arm64),
# HETEROFL_DATA_DIR (MNIST; default ../shared/datasets/mnist), PYTHON (the host's
# Python with heterofl-edge[server]; default .venv/bin/python).
#
# Not mounted in the root: /sys. onnxruntime >= 1.28 segfaults at import under qemu when
# it can read the host's CPU files there.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT=${1:-$REPO/bench/results/arm64.txt}
ROOT=${ROOT:-/var/tmp/heterofl-arm64}
DATA=${HETEROFL_DATA_DIR:-$REPO/../shared/datasets/mnist}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
WORK=$(mktemp -d /tmp/heterofl-arm64-XXXXXX)
LOG=$WORK/report.txt
COORDINATOR_PID=

report() { echo "$*" | tee -a "$LOG"; }

cleanup() {
  if [ -n "$COORDINATOR_PID" ]; then kill "$COORDINATOR_PID" 2>/dev/null || true; fi
  for mount in "$ROOT/dev" "$ROOT/proc"; do
    if mountpoint -q "$mount"; then umount "$mount"; fi
  done
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, binfmt)" >&2; exit 1; }
[ -f "$DATA/train-images-idx3-ubyte.gz" ] || { echo "no MNIST in $DATA" >&2; exit 1; }

# 1. qemu for aarch64 binaries, registered with binfmt_misc by hand (no systemd here).
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64

# 2. A minimal Debian arm64 root with Python 3.11 (about 3.5 minutes the first time).
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv \
    "$SUITE" "$ROOT" "${mirror:-http://deb.debian.org/debian}"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/root/ca.crt"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
in_root() {
  chroot "$ROOT" env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin \
    PIP_CERT=/root/ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 "$@"
}

# 3. The wheel, built here from this checkout (no build isolation: nothing downloaded).
mkdir -p "$WORK/source" "$WORK/dist"
cp "$REPO/pyproject.toml" "$REPO/README.md" "$WORK/source/"
(cd "$REPO" && tar --exclude=__pycache__ -cf - heterofl_edge exporter coordinator device_sim) \
  | tar -xf - -C "$WORK/source"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$WORK/dist" "$WORK/source"
WHEEL=$(basename "$WORK"/dist/heterofl_edge-*.whl)
rm -rf "$ROOT/opt/hfl" "$ROOT/opt/wheels" "$ROOT/opt/cache"
mkdir -p "$ROOT/opt/wheels" "$ROOT/opt/mnist"
cp "$WORK/dist/$WHEEL" "$ROOT/opt/wheels/"
cp "$DATA"/train-*-ubyte.gz "$ROOT/opt/mnist/"

report "heterofl-edge device client on emulated arm64 ($(date -u +%Y-%m-%d))"
report "host: $(uname -m), $(nproc) cores; qemu-user-static $(dpkg-query -W -f='${Version}' qemu-user-static)"
report "arm64 root: Debian $SUITE ($(in_root cat /etc/debian_version)), $(in_root uname -m), $(in_root python3 --version)"

# 4. The client, as a Raspberry Pi installs it: a virtualenv and pip, base dependencies only.
start=$(date +%s)
in_root python3 -m venv /opt/hfl
in_root /opt/hfl/bin/pip install --quiet "/opt/wheels/$WHEEL"
report "install: python3 -m venv + pip install $WHEEL: $(( $(date +%s) - start )) s (under emulation)"
report "installed: $(in_root /opt/hfl/bin/pip list --format=freeze | grep -v -E '^(pip|setuptools)==' | tr '\n' ' ')"
site=$ROOT/opt/hfl/lib/python3.11/site-packages
report "install size: $(du -sm "$ROOT/opt/hfl" | cut -f1) MB virtualenv, of which $(du -scm "$site"/* --exclude='pip*' --exclude='setuptools*' --exclude='_distutils_hack' --exclude='distutils-precedence.pth' | tail -1 | cut -f1) MB the client and its dependencies"
if in_root /opt/hfl/bin/python -c "import torch" 2>/dev/null; then
  report "FAIL: torch is importable in the client's virtualenv"; exit 1
fi
report "torch: not installed"

# 5. A coordinator on this host, on loopback: level e only, one round of one epoch.
PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
URL=http://127.0.0.1:$PORT
(cd "$REPO" && exec "$PYTHON" -m heterofl_edge coordinator serve --state-dir "$WORK/state" \
  --host 127.0.0.1 --port "$PORT" --mode e --policy fix --rounds 1 --fraction 1 \
  --min-devices 1 --min-uploads 1 --local-epochs 1 --round-seconds 1800 --stats-seconds 1800 \
  --device-timeout 600 --data-dir "$DATA" --test-examples 2000 --poll-seconds 0.5) \
  >"$WORK/coordinator.log" 2>&1 &
COORDINATOR_PID=$!
for _ in $(seq 600); do
  if curl -sf "$URL/v1/health" 2>/dev/null | grep -q '"artifacts_ready": *true'; then break; fi
  kill -0 "$COORDINATOR_PID" || { cat "$WORK/coordinator.log"; exit 1; }
  sleep 1
done

# 6. One device at level e in the arm64 root: 1,000 MNIST examples (shard 0 of 60).
start=$(date +%s)
in_root /opt/hfl/bin/heterofl-edge device --coordinator "$URL" --data-dir /opt/mnist \
  --shard 0 --clients 60 --cache /opt/cache | tee "$WORK/device.log"
report "device run (profile, register, one round, sBN statistics, done): $(( $(date +%s) - start )) s"
grep -E "registered|round 1|done" "$WORK/device.log" | sed 's/^/  device: /' | tee -a "$LOG"
curl -sf "$URL/v1/devices" >"$WORK/devices.json"
curl -sf "$URL/v1/rounds" >"$WORK/rounds.json"
"$PYTHON" - "$WORK/devices.json" "$WORK/rounds.json" <<'EOF' | tee -a "$LOG"
import json
import sys

devices = json.load(open(sys.argv[1]))["devices"]
rounds = json.load(open(sys.argv[2]))["rounds"]
for d in devices:
    print(
        f"training step (batch 10, level e) under emulation: {d['profile']['step_ms']:.1f} ms "
        "(the device's profile)"
    )
for r in rounds:
    metrics = r["metrics"]
    accuracy = (metrics.get("evaluation") or {}).get("global_accuracy")
    print(
        f"round {r['round']} {r['state']}: {metrics.get('uploads')} upload(s), "
        f"global accuracy {accuracy} on 2,000 test images"
    )
EOF
kill "$COORDINATOR_PID"
wait "$COORDINATOR_PID" 2>/dev/null || true
COORDINATOR_PID=
mkdir -p "$(dirname "$OUTPUT")"
cp "$LOG" "$OUTPUT"
echo "wrote $OUTPUT"
