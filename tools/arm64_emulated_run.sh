#!/usr/bin/env bash
# The edge client on arm64 without PyTorch, emulated: a Debian bookworm arm64 userland (Python 3.11, the same
# Python as Raspberry Pi OS bookworm) runs under qemu user-mode emulation on this x86 machine, installs the client
# from aarch64 wheels only with the device recipe (tools/install_edge.py: no huggingface-hub stack, no pip), and
# trains a tiny model's head for a few steps against a real server on this machine over loopback (a chroot shares
# the host's network namespace).
#
#   sudo tools/arm64_emulated_run.sh            # Linux, root; about 10-20 min the first time, a few after
#
# Environment (all optional):
#   EDGESPLIT_ARM64_ROOT   where the rootfs, wheels and run files are cached      (/var/tmp/edgesplit-arm64)
#   EDGESPLIT_REPO         the edgesplit checkout to build the wheel and run the server from    (this repo)
#   EDGESPLIT_HOST_PYTHON  host Python with edgesplit's server and export extras (torch)         (python3)
#   EDGESPLIT_DEBIAN_MIRROR                                                     (http://deb.debian.org/debian)
#   EDGESPLIT_STEPS        training steps (one round)                                                    (3)
#   EDGESPLIT_CLIENT_TIMEOUT  seconds the emulated client may take                                   (1800)
#   EDGESPLIT_DEVICE_PROFILE  the client's --device-profile                                 (raspberry-pi-4)
#   EDGESPLIT_ARTIFACTS    an export to train instead of the tiny model (SmolLM2 cut 4 int8: slow)   (none)
#   EDGESPLIT_QUANTIZE     the tiny model's --quantize: int8 runs the MatMulNBits kernels of arm64     (int8)
#   EDGESPLIT_QEMU_CPU     the Arm core qemu emulates: cortex-a72 (Pi 4) or cortex-a76 (Pi 5)    (cortex-a72)
#
# Idempotent: the rootfs is built once (a marker file says it is complete; a half-built one is removed and
# built again), and the wheels, the edgesplit wheel, the venv and the tiny model's artifacts are rebuilt on every
# run so that they match the checkout; the artifacts are bind-mounted read-only into the
# chroot and every mount is undone on exit. Not part of the test suite or CI: emulation is slow.
# Needs: debootstrap, qemu-user-static and binfmt-support (apt-get install debootstrap qemu-user-static
# binfmt-support), and network access to a Debian mirror and PyPI (the chroot itself needs neither).
set -euo pipefail

ROOT=${EDGESPLIT_ARM64_ROOT:-/var/tmp/edgesplit-arm64}
REPO=$(cd "${EDGESPLIT_REPO:-$(dirname "$0")/..}" && pwd)
HOST_PY=${EDGESPLIT_HOST_PYTHON:-python3}
MIRROR=${EDGESPLIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
STEPS=${EDGESPLIT_STEPS:-3}
CLIENT_TIMEOUT=${EDGESPLIT_CLIENT_TIMEOUT:-1800}
DEVICE_PROFILE=${EDGESPLIT_DEVICE_PROFILE:-raspberry-pi-4}
export QEMU_CPU=${EDGESPLIT_QEMU_CPU:-cortex-a72}
ARTIFACTS=${EDGESPLIT_ARTIFACTS:-}
ROOTFS=$ROOT/rootfs
RUN=$ROOT/run
IN_CHROOT=/opt/edgesplit                     # the same folder seen from inside the chroot
MOUNTED=()
SERVER_PID=

say() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
die() { printf 'arm64_emulated_run: %s\n' "$*" >&2; exit 1; }

cleanup() {
    if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill "$SERVER_PID"; wait "$SERVER_PID" || true; fi
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" || true; done
}
trap cleanup EXIT

mount_in_rootfs() {  # mount_in_rootfs proc|bind|bind-ro SOURCE TARGET
    local target=$ROOTFS$3
    mountpoint -q "$target" 2>/dev/null && return 0
    [[ -e $target ]] || mkdir -p "$target"
    case $1 in
        bind) mount --bind "$2" "$target" ;;
        bind-ro) mount --bind "$2" "$target" && mount -o remount,bind,ro "$target" ;;
        *) mount -t "$1" "$2" "$target" ;;
    esac
    MOUNTED+=("$target")
}

# The export, serve and client command lines are edgesplit.server.orchestrate's records, as the demo's, the
# bench scripts' and the tests' are, rendered by the host's edgesplit one argument a line (the client's too: the
# arm64 venv holds a wheel of this same checkout). A bad value stops the script with the record's own message.
argv_of() {  # argv_of export|serve|client FIELD=VALUE...
    PYTHONPATH=$REPO "$HOST_PY" -m edgesplit.server.orchestrate "$@" || die "cannot build the $1 command"
}

# qemu reads QEMU_CPU from the environment of every process it starts, so it has to survive `env -i`.
in_chroot() { chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"; }

# ----------------------------------------------------------------------------------------------- preflight
say "preflight"
[[ $(id -u) == 0 ]] || die "needs root (debootstrap, chroot, mount)"
command -v debootstrap >/dev/null || die "debootstrap missing: apt-get install debootstrap"
[[ -x /usr/bin/qemu-aarch64-static ]] || die "qemu-aarch64-static missing: apt-get install qemu-user-static binfmt-support"
if [[ ! -e /proc/sys/fs/binfmt_misc/status ]]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc (a container without it cannot run foreign binaries)"
fi
if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
    update-binfmts --enable qemu-aarch64 || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "qemu-aarch64 is registered without the F flag: the chroot cannot find the interpreter"
"$HOST_PY" -c 'import torch, transformers' 2>/dev/null || die "$HOST_PY lacks torch/transformers (the server and exporter need them)"
echo "host: $(uname -m), $("$HOST_PY" --version), repo $REPO, cache $ROOT"
mkdir -p "$ROOT" "$RUN"
# Mounts left behind by a run that was killed: unmount them before anything under the rootfs is removed.
{ grep -o " $ROOTFS/[^ ]*" /proc/mounts || true; } | sort -r | while read -r leftover; do umount -l "$leftover"; done

# --------------------------------------------------------------------------------------------- the rootfs
if [[ ! -e $ROOTFS/.edgesplit-rootfs-complete ]]; then
    if [[ -e $ROOTFS ]]; then
        say "removing a half-built rootfs"
        grep -q " $ROOTFS" /proc/mounts && die "something is still mounted under $ROOTFS; unmount it first"
        rm -rf "$ROOTFS"
    fi
    say "debootstrap, first stage (host side, downloads arm64 .debs)"
    debootstrap --arch=arm64 --variant=minbase --foreign --include=python3,python3-venv bookworm "$ROOTFS" "$MIRROR"
    say "debootstrap, second stage (arm64 binaries under qemu: slow)"
    chroot "$ROOTFS" /debootstrap/debootstrap --second-stage
    touch "$ROOTFS/.edgesplit-rootfs-complete"
else
    say "rootfs cached at $ROOTFS"
fi
mount_in_rootfs proc proc /proc
mount_in_rootfs bind /dev /dev
mount_in_rootfs bind-ro /sys /sys
# qemu-user (7.2) passes the host's /proc/cpuinfo through, so the arm64 program reads an x86 one. ONNX Runtime's
# cpuinfo library finds no Arm processor in it and `import onnxruntime` dies with SIGSEGV. A real board has a real
# one: give the chroot an Arm /proc/cpuinfo for the emulated core, one entry per CPU that /sys lists.
case $QEMU_CPU in
    cortex-a72) CPU_PART=0xd08 CPU_FEATURES="fp asimd evtstrm crc32 cpuid" ;;
    cortex-a76) CPU_PART=0xd0b CPU_FEATURES="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp" ;;
    *) die "EDGESPLIT_QEMU_CPU=$QEMU_CPU: use cortex-a72 or cortex-a76" ;;
esac
: >"$ROOT/cpuinfo"
for ((cpu = 0; cpu < $(nproc --all); cpu++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: %s\nCPU revision\t: 1\n\n' \
        "$cpu" "$CPU_FEATURES" "$CPU_PART" >>"$ROOT/cpuinfo"
done
mount_in_rootfs bind-ro "$ROOT/cpuinfo" /proc/cpuinfo
echo "chroot: $(in_chroot uname -m), $(in_chroot python3 --version), $(grep PRETTY_NAME "$ROOTFS/etc/os-release"), qemu cpu $QEMU_CPU"

# ----------------------------------------------------------------------------------------- the wheels
say "aarch64 wheels for CPython 3.11 (tools/check_edge_install.py)"
"$HOST_PY" "$REPO/tools/check_edge_install.py" --python 3.11 --isolated --brief --pyproject "$REPO/pyproject.toml" \
    --dest "$ROOT/wheels" >"$RUN/check_edge_install.json" || { cat "$RUN/check_edge_install.json"; die "the wheels do not resolve"; }
"$HOST_PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["summary"])' "$RUN/check_edge_install.json"
rm -rf "$ROOT/wheels/dist"
"$HOST_PY" -m pip wheel --no-deps --quiet -w "$ROOT/wheels/dist" "$REPO"
mkdir -p "$ROOTFS$IN_CHROOT"
rm -rf "$ROOTFS$IN_CHROOT/wheels"
cp -r "$ROOT/wheels" "$ROOTFS$IN_CHROOT/wheels"

# ------------------------------------------------------------------------------- the venv inside arm64
say "venv inside the arm64 userland: tools/install_edge.py from those wheels only (--no-index: no downloads)"
cp "$REPO/tools/install_edge.py" "$ROOTFS$IN_CHROOT/install_edge.py"
WHEEL=$(cd "$ROOT/wheels/dist" && ls edgesplit-*.whl)
# The one command of docs/devices.md, as a Pi runs it without internet; --replace: a new venv every run.
in_chroot python3 "$IN_CHROOT/install_edge.py" "$IN_CHROOT/venv" "$IN_CHROOT/wheels/dist/$WHEEL" --replace \
    -- --no-index --find-links "$IN_CHROOT/wheels/cp311"
in_chroot "$IN_CHROOT/venv/bin/python" - <<'EOF'
import importlib.util, platform, sys
import numpy, onnxruntime
missing = [name for name in ("torch", "transformers", "peft", "huggingface_hub", "pip")
           if importlib.util.find_spec(name) is not None]
assert not missing, f"the arm64 venv holds {missing}"
print(f"inside: {platform.machine()} {platform.python_version()}; numpy {numpy.__version__}, onnxruntime "
      f"{onnxruntime.__version__}, providers {onnxruntime.get_available_providers()}; torch: not installed")
EOF
echo "installed: $(in_chroot "$IN_CHROOT/venv/bin/python" -c 'import importlib.metadata as m
print(" ".join(sorted(f"{d.name}=={d.version}" for d in m.distributions())))')"
SITE=$ROOTFS$IN_CHROOT/venv/lib/python3.11/site-packages
echo "site-packages: $(($(du -s --block-size=1 "$SITE" | cut -f1) / 1000000)) MB (onnxruntime $(($(du -s --block-size=1 "$SITE/onnxruntime" | cut -f1) / 1000000)) MB, numpy $(($(du -s --block-size=1 "$SITE/numpy" "$SITE/numpy.libs" 2>/dev/null | awk '{s += $1} END {print s}') / 1000000)) MB)"

# ------------------------------------------------------------------------- the tiny model, on the host
if [[ -z $ARTIFACTS ]]; then
    say "tiny model and its artifacts (host: torch)"
    rm -rf "$RUN/tiny" "$RUN/artifacts"
    PYTHONPATH=$REPO:$REPO/tests "$HOST_PY" -c 'import sys; from pathlib import Path; from tiny_models import save_tiny_model; save_tiny_model("llama", Path(sys.argv[1]))' "$RUN/tiny" 2>/dev/null
    export_argv=$(argv_of export model="$RUN/tiny" cut_layer=1 batch_size=2 max_seq_len=16 lora_rank=4 \
        quantize="${EDGESPLIT_QUANTIZE:-int8}" out="$RUN/artifacts")
    mapfile -t EXPORT_ARGV <<<"$export_argv"
    PYTHONPATH=$REPO "$HOST_PY" -m edgesplit.cli "${EXPORT_ARGV[@]}" >"$RUN/export.log" 2>&1 \
        || { cat "$RUN/export.log"; die "export failed"; }
    tail -1 "$RUN/export.log"
    ARTIFACTS=$RUN/artifacts
else
    ARTIFACTS=$(cd "$ARTIFACTS" && pwd)
    say "artifacts from EDGESPLIT_ARTIFACTS: $ARTIFACTS"
fi
"$HOST_PY" - "$RUN/train.jsonl" <<'EOF'
import json, random, sys
random.seed(0)  # prompt "wA wA+1" -> completion "wA+2 wA+3", the integration test's task
with open(sys.argv[1], "w") as handle:
    for _ in range(16):
        a = random.randrange(40)
        handle.write(json.dumps({"prompt": f"w{a} w{a + 1}", "completion": f"w{a + 2} w{a + 3}"}) + "\n")
EOF
rm -rf "${ROOTFS:?}$IN_CHROOT/run"  # nothing is mounted under the rootfs here (leftovers were unmounted above)
mkdir -p "$ROOTFS$IN_CHROOT/run"
cp "$RUN/train.jsonl" "$ROOTFS$IN_CHROOT/run/"
mount_in_rootfs bind-ro "$ARTIFACTS" "$IN_CHROOT/run/artifacts"  # read-only: the client must not need to write

# --------------------------------------------------------------------------- the server and the client
PORT=$("$HOST_PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
say "server on the host (x86, torch) at ws://127.0.0.1:$PORT: 1 round of $STEPS steps"
rm -f "$RUN/server.jsonl"
serve_argv=$(argv_of serve artifacts="$ARTIFACTS" host=127.0.0.1 port="$PORT" rounds=1 min_clients=1 \
    steps_per_round="$STEPS" learning_rate=0.02 metrics_out="$RUN/server.jsonl")
mapfile -t SERVE_ARGV <<<"$serve_argv"
# Paths as the chroot sees them: the client runs inside it.
client_argv=$(argv_of client server="ws://127.0.0.1:$PORT" artifacts="$IN_CHROOT/run/artifacts" \
    data="$IN_CHROOT/run/train.jsonl" client_id=arm64-emulated device_profile="$DEVICE_PROFILE" \
    connect_timeout_s=120 metrics_out="$IN_CHROOT/run/client.jsonl")
mapfile -t CLIENT_ARGV <<<"$client_argv"
PYTHONPATH=$REPO "$HOST_PY" -m edgesplit.cli "${SERVE_ARGV[@]}" >"$RUN/server.log" 2>&1 &
SERVER_PID=$!

say "client inside the arm64 userland (qemu), no torch"
set +e
timeout "$CLIENT_TIMEOUT" chroot "$ROOTFS" /usr/bin/env -i QEMU_CPU="$QEMU_CPU" PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    "$IN_CHROOT/venv/bin/edgesplit" "${CLIENT_ARGV[@]}" 2>&1 | tee "$RUN/client.log"
client_rc=${PIPESTATUS[0]}
set -e
server_rc=0
if ((client_rc == 0)); then
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    wait "$SERVER_PID" || server_rc=$?
    SERVER_PID=
fi
echo "--- server log"; cat "$RUN/server.log"
cp "$ROOTFS$IN_CHROOT/run/client.jsonl" "$RUN/client.jsonl" 2>/dev/null || true

say "result"
"$HOST_PY" - "$RUN/client.jsonl" "$client_rc" "$server_rc" <<'EOF'
import json, sys
from pathlib import Path
path, client_rc, server_rc = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
summary = next((r for r in records if r["event"] == "summary"), None)
steps = [r for r in records if r["event"] == "step"]
result = {"client_exit": client_rc, "server_exit": server_rc, "steps": len(steps),
          "losses": [round(r["loss"], 4) for r in steps],
          "step_seconds": [round(sum(r["seconds"].values()), 2) for r in steps]}
if summary:
    result.update({key: summary.get(key) for key in ("seconds", "peak_rss_mb", "energy_method", "energy_source",
                                                      "bytes_up", "bytes_down")})
print(json.dumps(result, indent=2))
sys.exit(0 if client_rc == 0 and server_rc == 0 and summary else 1)
EOF
