#!/usr/bin/env bash
# The device client on arm64 (a Raspberry Pi's CPU), emulated: a maintainer's check, not CI.
#
#   sudo scripts/check_arm64.sh [OUTPUT]      (Debian or Ubuntu host, root, network to PyPI)
#
# Builds a Debian bookworm arm64 root with debootstrap and qemu-user-static and installs
# the client there with pip, as a Raspberry Pi does (the wheel built here from this
# checkout, its dependencies from PyPI's aarch64 wheels), twice: the base install (the onnx
# runtime, no torch) and one with the ExecuTorch runtime. Then, against coordinators on
# this host (127.0.0.1, level e only, one round each):
#   * one device per runtime (onnx; executorch, i.e. the XNNPACK program on NEON kernels)
#     trains one round inside the arm64 root, keeping its registration in --state-dir and
#     reporting its peak memory; its upload (the round's model) is compared with eager
#     PyTorch training of the same task on this host, within the export's parity bound;
#   * the device's footprint per level a..e and runtime: the peak resident memory of a
#     training session (python -m device_sim.footprint, on artifacts exported here).
# Prints install sizes, step times and memory under emulation; OUTPUT (default
# bench/results/arm64.txt) gets a copy, and OUTPUT with .json for .txt the figures.
#
# Environment: ROOT (the arm64 root, kept between runs; default /var/tmp/heterofl-arm64),
# HETEROFL_DATA_DIR (MNIST; default ../shared/datasets/mnist), PYTHON (the host's
# Python with heterofl-edge[server,executorch]; default .venv/bin/python).
#
# The root's /sys is a folder of three files, /sys/devices/system/cpu/{possible,present,
# online}, naming the host's cores: qemu-user passes the host's x86 CPU files through,
# onnxruntime >= 1.28 segfaults at import when it reads them, and XNNPACK refuses to start
# ("XNNPACK status: 0x5", unsupported hardware) when cpuinfo finds no CPU list at all. The
# instruction set XNNPACK picks its kernels for is qemu's (getauxval's AT_HWCAP: NEON and
# more). pip's downloads stay cached in the root (/root/.cache/pip): a second run installs
# the same wheels without downloading them.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
OUTPUT=${1:-$REPO/bench/results/arm64.txt}
JSON=${OUTPUT%.txt}.json
ROOT=${ROOT:-/var/tmp/heterofl-arm64}
DATA=${HETEROFL_DATA_DIR:-$REPO/../shared/datasets/mnist}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
WORK=$(mktemp -d /tmp/heterofl-arm64-XXXXXX)
LOG=$WORK/report.txt
FIGURES=$WORK/figures.jsonl  # one JSON object per measurement, gathered into $JSON at the end
COORDINATOR_PID=
FAILED=0  # a failed measurement is reported and the others still run; the exit code says so
TOLERANCE=1e-4  # exporter.config.VERIFY_TOLERANCE: the export's parity bound
LEVELS=a,b,c,d,e

report() { echo "$*" | tee -a "$LOG"; }
figure() { echo "$1" >>"$FIGURES"; }

cleanup() {
  if [ -n "$COORDINATOR_PID" ]; then kill "$COORDINATOR_PID" 2>/dev/null || true; fi
  for mount in "$ROOT/dev" "$ROOT/proc" "$ROOT/sys"; do
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
mkdir -p "$WORK/sys/devices/system/cpu" "$ROOT/sys"
for list in possible present online; do
  echo "0-$(( $(nproc) - 1 ))" >"$WORK/sys/devices/system/cpu/$list"
done
mountpoint -q "$ROOT/sys" && umount "$ROOT/sys"
mount --bind "$WORK/sys" "$ROOT/sys"
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
venv_mb=$(du -sm "$ROOT/opt/hfl" | cut -f1)
client_mb=$(du -scm "$site"/* --exclude='pip*' --exclude='setuptools*' --exclude='_distutils_hack' --exclude='distutils-precedence.pth' | tail -1 | cut -f1)
report "install size: $venv_mb MB virtualenv, of which $client_mb MB the client and its dependencies"
figure "{\"install\": \"onnx\", \"venv_mb\": $venv_mb, \"client_mb\": $client_mb}"
if in_root /opt/hfl/bin/python -c "import torch" 2>/dev/null; then
  report "FAIL: torch is importable in the client's virtualenv"; exit 1
fi
report "torch: not installed"

# 5. The ExecuTorch runtime: the same wheel, plus torch from PyPI and ExecuTorch's wheel.
# executorch 1.4.1 declares coremltools 9.0 (and scikit-learn, pandas, hydra ...), and
# coremltools has no aarch64 wheel, only a source release that pip would compile (a C++
# toolchain and minutes to hours on a Pi; not attempted here). The runtime never imports
# it: executorch goes in without its declared dependencies, beside the packages its
# runtime imports (torchao, ruamel.yaml, flatbuffers, tabulate). PyPI's aarch64 torch
# 2.13.0 is the CUDA build: it brings NVIDIA's CUDA libraries and loads them at import.
start=$(date +%s)
rm -rf "$ROOT/opt/hfl-et"
in_root python3 -m venv /opt/hfl-et
if ! in_root /opt/hfl-et/bin/pip install --quiet --progress-bar off "/opt/wheels/$WHEEL" \
  torch==2.13.0 torchao==0.18.0 ruamel.yaml flatbuffers tabulate >"$WORK/pip-et.log" 2>&1 \
  || ! in_root /opt/hfl-et/bin/pip install --quiet --progress-bar off --no-deps \
  executorch==1.4.1 >>"$WORK/pip-et.log" 2>&1; then
  report "FAIL: installing the executorch runtime: $(grep -E '^ERROR' "$WORK/pip-et.log" | head -3)"
  exit 1
fi
report "install (executorch runtime): venv + the wheel + torch 2.13.0 + executorch 1.4.1 (--no-deps) and what its runtime imports: $(( $(date +%s) - start )) s (under emulation; wheels from pip's cache where an earlier run downloaded them)"
site=$ROOT/opt/hfl-et/lib/python3.11/site-packages
et_mb=$(du -sm "$ROOT/opt/hfl-et" | cut -f1)
torch_mb=$(du -scm "$site"/torch "$site"/torch-*.dist-info | tail -1 | cut -f1)
cuda_mb=$(du -scm "$site"/nvidia* "$site"/cuda* "$site"/triton* 2>/dev/null | tail -1 | cut -f1)
executorch_mb=$(du -scm "$site"/executorch "$site"/executorch-*.dist-info | tail -1 | cut -f1)
report "install size (executorch runtime): $et_mb MB virtualenv: torch $torch_mb MB, NVIDIA CUDA libraries and triton $cuda_mb MB (PyPI's aarch64 torch is the CUDA build), executorch $executorch_mb MB"
figure "{\"install\": \"executorch\", \"venv_mb\": $et_mb, \"torch_mb\": $torch_mb, \"cuda_mb\": $cuda_mb, \"executorch_mb\": $executorch_mb}"

# 6. One round per runtime: a coordinator on this host, on loopback, level e only, one round
# of one epoch; the device in the arm64 root holds 50 examples (shard 0 of 60 of 3,000):
# 5 steps of batch 10, within the export's own verification (10 steps), since batch-10
# BatchNorm on MNIST turns float32 reordering into chaotic drift over longer sessions.
round_with() {  # RUNTIME VENV
  local runtime=$1 venv=$2 port url state=$WORK/state-$1 start took
  port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  url=http://127.0.0.1:$port
  (cd "$REPO" && exec "$PYTHON" -m heterofl_edge coordinator serve --state-dir "$state" \
    --host 127.0.0.1 --port "$port" --mode e --policy fix --rounds 1 --fraction 1 \
    --min-devices 1 --min-uploads 1 --local-epochs 1 --round-seconds 1800 --stats-seconds 1800 \
    --device-timeout 600 --data-dir "$DATA" --test-examples 2000 --poll-seconds 0.5 \
    --formats onnx,executorch) >"$WORK/coordinator-$runtime.log" 2>&1 &
  COORDINATOR_PID=$!
  for _ in $(seq 900); do
    if curl -sf "$url/v1/health" 2>/dev/null | grep -q '"artifacts_ready": *true'; then break; fi
    kill -0 "$COORDINATOR_PID" || { cat "$WORK/coordinator-$runtime.log"; exit 1; }
    sleep 1
  done
  curl -sf "$url/v1/model" -o "$WORK/initial-$runtime.safetensors"
  rm -rf "$ROOT/opt/device-$runtime"
  start=$(date +%s)
  if ! in_root "$venv/bin/heterofl-edge" device --coordinator "$url" --data-dir /opt/mnist \
    --shard 0 --clients 60 --train-examples 3000 --runtime "$runtime" \
    --state-dir "/opt/device-$runtime" --max-memory-mb 2048 >"$WORK/device-$runtime.log" 2>&1; then
    report "FAIL: the $runtime device in the arm64 root ended with an error after $(( $(date +%s) - start )) s:"
    grep -v -E '^\[cpuinfo_utils' "$WORK/device-$runtime.log" | tail -5 | sed 's/^/  /' | tee -a "$LOG"
    kill "$COORDINATOR_PID"
    wait "$COORDINATOR_PID" 2>/dev/null || true
    COORDINATOR_PID=
    return 1
  fi
  took=$(( $(date +%s) - start ))
  report "device run, $runtime runtime (profile, register, one round, sBN statistics, done): $took s"
  grep -E "^device 0: (registered|memory:|round 1|coordinator says)" "$WORK/device-$runtime.log" \
    | sed 's/^/  /' | tee -a "$LOG"
  report "  its state folder: $(stat -c '%n, mode %a' "$ROOT/opt/device-$runtime/device.json" | sed "s#^$ROOT##")"
  curl -sf "$url/v1/devices" >"$WORK/devices-$runtime.json"
  curl -sf "$url/v1/rounds" >"$WORK/rounds-$runtime.json"
  curl -sf "$url/v1/model" -o "$WORK/final-$runtime.safetensors"
  kill "$COORDINATOR_PID"
  wait "$COORDINATOR_PID" 2>/dev/null || true
  COORDINATOR_PID=
  (cd "$REPO" && "$PYTHON" - "$runtime" "$WORK" "$DATA" "$TOLERANCE" "$took") <<'PY' | tee -a "$LOG"
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.torch import load

from device_sim.runtimes import get_runtime
from device_sim.worker import WorkerConfig, device_examples
from heterofl_edge.device_runtime import TrainingRequest
from heterofl_edge.sessions import ClientArrays, TrainJob, run_training
from heterofl_edge.strategy import client_seed
from heterofl_edge.training import LocalTrainingConfig

runtime, work, data = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
tolerance, took = float(sys.argv[4]), int(sys.argv[5])
device = json.loads((work / f"devices-{runtime}.json").read_text())["devices"][0]
record = json.loads((work / f"rounds-{runtime}.json").read_text())["rounds"][0]
initial = load((work / f"initial-{runtime}.safetensors").read_bytes())
served = load((work / f"final-{runtime}.safetensors").read_bytes())
metrics = record["assignments"][0]["metrics"]
accuracy = (record["metrics"].get("evaluation") or {}).get("global_accuracy")
step_ms = device["profile"]["step_ms"]
print(f"  training step (batch 10, level e) under emulation: {step_ms:.1f} ms (the profile)")
print(
    f"  round 1 {record['state']}: {record['uploads']} upload(s), global accuracy {accuracy} "
    f"on 2,000 test images; the device's peak memory {metrics.get('peak_memory_mb')} MB"
)

# The task the coordinator gave: its seed 0, round 1, the first device's position; conv's
# local training (E = 1, B = 10, momentum 0.9, weight decay 5e-4, clipping at 1).
config = WorkerConfig("unused", Path(data), Path("unused"), clients=60, train_examples=3000)
x, y = device_examples(config)
held = tuple(int(v) for v in np.unique(y))
seed, lr = client_seed(0, 1, 0), float(record["lr"])
start = {k: v.numpy() for k, v in initial.items()}
local = LocalTrainingConfig(epochs=1, batch_size=10)
job = TrainJob("arm64", "conv", 0.0625, 0.0625, lr, seed, np.arange(len(y)), held, 10, local, start)
eager = run_training(job, ClientArrays(x, y)).update
names = sorted(eager)
# One device holding all ten labels: every element of the round's model is its upload.
upload = {n: served[n].numpy() for n in names}
worst = max(float(np.abs(upload[n] - eager[n]).max()) for n in names)
moved = max(float(np.abs(upload[n] - start[n]).max()) for n in names)
folder = next((work / f"state-{runtime}" / "artifacts").glob("conv-e*"))
request = TrainingRequest({n: start[n] for n in names}, x, y, list(held), lr, 1, 10, seed)
here = get_runtime(runtime)(folder).train(request).weights
native = max(float(np.abs(upload[n] - np.asarray(here[n])).max()) for n in names)
verdict = "within" if worst <= tolerance else "OUTSIDE"
print(
    f"  upload ({len(names)} tensors; {len(y)} examples, {len(y) // 10} steps, {len(held)} of 10 "
    f"labels) vs eager PyTorch on this host: largest difference {worst:.1e}, {verdict} the "
    f"export's parity bound {tolerance:g}; vs the same {runtime} program on this host: "
    f"{native:.1e}; training moved the weights by up to {moved:.1e}"
)
row = {
    "round": runtime,
    "step_ms": round(step_ms, 1),
    "device_run_s": took,
    "state": record["state"],
    "peak_memory_mb": metrics.get("peak_memory_mb"),
    "vs_eager": worst,
    "vs_host_runtime": native,
    "bound": tolerance,
    "moved": moved,
}
with open(work / "figures.jsonl", "a") as out:
    out.write(json.dumps(row) + "\n")
sys.exit(0 if worst <= tolerance and record["state"] == "finished" else 1)
PY
}
round_with onnx /opt/hfl || FAILED=1
round_with executorch /opt/hfl-et || FAILED=1

# 7. Footprint per level: levels a..e of the conv model (global model a), exported here in
# both formats without verification (the rounds above and the exporter's tests verify). A
# fresh process per level and runtime holds 100 examples (shard 0 of 600), trains 5 steps
# of batch 10 and computes sBN statistics, as a device under --max-memory-mb does: in the
# arm64 root, and natively on this host for comparison (qemu-user's own memory, its
# translated code among it, counts in the emulated process's).
start=$(date +%s)
(cd "$REPO" && "$PYTHON" -m heterofl_edge export --model conv --level all --format all \
  --no-verify --out "$WORK/artifacts") >"$WORK/export.log" 2>&1
report "exported levels $LEVELS, onnx and executorch, on this host: $(( $(date +%s) - start )) s"
rm -rf "$ROOT/opt/artifacts"
cp -r "$WORK/artifacts" "$ROOT/opt/artifacts"
FOOTPRINT=(--levels "$LEVELS" --clients 600 --steps 5)
for runtime in onnx executorch; do
  venv=/opt/hfl
  [ "$runtime" = executorch ] && venv=/opt/hfl-et
  start=$(date +%s)
  if ! in_root "$venv/bin/python" -m device_sim.footprint --artifacts /opt/artifacts \
    --runtime "$runtime" --data-dir /opt/mnist "${FOOTPRINT[@]}" \
    >"$WORK/footprint-$runtime.jsonl" 2>"$WORK/footprint-$runtime.err"; then
    report "FAIL: footprint, $runtime runtime: $(grep -v -E '^\[cpuinfo_utils' "$WORK/footprint-$runtime.err" | tail -3)"
    FAILED=1
  fi
  report "footprint, $runtime runtime, levels $LEVELS: $(( $(date +%s) - start )) s (under emulation)"
  sed 's/}$/, "machine": "arm64 (qemu)"}/' "$WORK/footprint-$runtime.jsonl" >>"$FIGURES"
  (cd "$REPO" && "$PYTHON" -m device_sim.footprint --artifacts "$WORK/artifacts" \
    --runtime "$runtime" --data-dir "$DATA" "${FOOTPRINT[@]}" 2>/dev/null) \
    | sed 's/}$/, "machine": "x86-64 (native)"}/' >>"$FIGURES" || FAILED=1
done
"$PYTHON" - "$FIGURES" <<'PY' | tee -a "$LOG"
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if '"peak_mb"' in line]
machines = ("arm64 (qemu)", "x86-64 (native)")
print("peak resident memory of a device process training a level, MB (before any level: base)")
print(f"  {'level':<6}" + "".join(f"{m + ' ' + r:>30}" for m in machines for r in ("onnx", "executorch")))
for level in "abcde":
    cells = []
    for machine in machines:
        for runtime in ("onnx", "executorch"):
            found = [
                r for r in rows
                if (r["level"], r["runtime"], r["machine"]) == (level, runtime, machine)
            ]
            cells.append(
                f"{found[0]['peak_mb']:.0f} (base {found[0]['base_mb']:.0f})" if found else "-"
            )
    print(f"  {level:<6}" + "".join(f"{c:>30}" for c in cells))
PY

mkdir -p "$(dirname "$OUTPUT")"
cp "$LOG" "$OUTPUT"
"$PYTHON" - "$FIGURES" "$JSON" <<'PY'
import json
import sys

figures = [json.loads(line) for line in open(sys.argv[1])]
summary = {
    "install": [f for f in figures if "install" in f],
    "rounds": [f for f in figures if "round" in f],
    "footprint": [f for f in figures if "peak_mb" in f],
}
with open(sys.argv[2], "w") as out:
    json.dump(summary, out, indent=1)
    out.write("\n")
PY
echo "wrote $OUTPUT and $JSON"
exit "$FAILED"
