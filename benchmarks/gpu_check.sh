#!/usr/bin/env bash
# One NVIDIA GPU, at most 5 minutes: the checks the CPU machines cannot make, written to
# benchmarks/results/gpu-<name>.md (name from the GPU, e.g. gpu-nvidia-h200.md).
#
#   bash benchmarks/gpu_check.sh [--out FILE] [--python PY] [--dry-run] [--help]
#
# Exit codes: 0 every check passed; 1 a check failed (the report says which); 2 a wrong argument;
# 77 no NVIDIA GPU here: nothing was checked (the automake "skipped" code).
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
OUT=""
DRY_RUN=0
BUDGET_S=300

# name | seconds allowed | what it checks
STEPS=(
  "env|15|GPU, driver, torch / CUDA / cuDNN / xformers / diffusers versions"
  "pytest-cuda|60|pytest -m cuda tests/test_gpu_check.py (CUDA tests; they skip without CUDA)"
  "txt2img|45|demo model txt2img in fp32, bf16, fp16 on the GPU against the CPU fp32 images; none black or NaN"
  "attention|15|SDPA vs xformers (if installed) vs the fp32 math reference: equality and speed, fp16"
  "unet|90|SD-v1-shaped UNet step, 64x64 latents, batch 1, fp16: ours vs diffusers, it/s and difference"
  "vae|20|kl-f8 decode to 512 px in fp32, fp16 and bf16 (txt2img's guard against fp16 NaN / black images)"
  "train|55|two training steps of the demo model (shapes-small, batch 32) with lightning precision bf16-mixed"
)

usage() {
  cat <<EOF
usage: bash benchmarks/gpu_check.sh [--out FILE] [--python PY] [--dry-run] [--help]

Checks one NVIDIA GPU in at most ${BUDGET_S} s and writes a markdown report
(default: benchmarks/results/gpu-<gpu name>.md). Steps, each with its time limit:

$(for step in "${STEPS[@]}"; do IFS='|' read -r name limit what <<<"$step"; printf '  %-12s %4ss  %s\n' "$name" "$limit" "$what"; done)

  --out FILE    write the report here instead
  --python PY   the interpreter (default: \$PYTHON, else .venv/bin/python, else python3)
  --dry-run     list the steps and the commands they run; check nothing, write nothing
  --help        this text

Exit codes: 0 all passed, 1 a check failed, 2 a wrong argument, 77 no NVIDIA GPU (nothing checked).
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a file name" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --python) [ $# -ge 2 ] || { echo "gpu_check: --python needs an interpreter" >&2; exit 2; }; PY="$2"; shift 2 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="python3"; fi
fi
cd "$REPO" || exit 2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

step_command() {  # the command line of one step
  case "$1" in
    env|txt2img|attention|unet|vae) echo "$PY benchmarks/gpu_check.py $1 --device cuda" ;;
    pytest-cuda) echo "$PY -m pytest -q -m cuda tests/test_gpu_check.py -p no:cacheprovider" ;;
    train) echo "$PY scripts/train_diffusion.py --config latent-diffusion/shapes-small --init-from ldm/assets/demo-shapes.safetensors --run-dir \$TMP/train --max-steps 2 lightning.accelerator=gpu lightning.precision=bf16-mixed lightning.image_every=0 lightning.val_every=0" ;;
  esac
}

if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check dry run: ${#STEPS[@]} steps, at most ${BUDGET_S} s in all; nothing is run"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit what <<<"$step"
    printf '%-12s %4ss  %s\n               $ %s\n' "$name" "$limit" "$what" "$(step_command "$name")"
  done
  echo "report: ${OUT:-benchmarks/results/gpu-<gpu name>.md}"
  exit 0
fi

# -- is there a GPU? (quick: no model is loaded before this answers) -----------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" || [ -z "$GPU_NAME" ]; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or lists no GPU): nothing checked. Run it on a machine with one NVIDIA GPU; --dry-run lists the steps." >&2
  exit 77
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: nvidia-smi lists '$GPU_NAME' but torch sees no CUDA device (CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}', or a CPU-only torch build in $PY): nothing checked." >&2
  exit 77
fi

SLUG="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')"
OUT="${OUT:-benchmarks/results/gpu-${SLUG:-gpu}.md}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$(dirname "$OUT")"

START=$(date +%s)
FAILED=()
{
  echo "# GPU check: $GPU_NAME"
  echo
  echo "\`bash benchmarks/gpu_check.sh\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---:|"
} >"$TMP/head.md"
: >"$TMP/body.md"

for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit what <<<"$step"
  elapsed=$(( $(date +%s) - START ))
  left=$(( BUDGET_S - elapsed ))
  if [ "$left" -le 5 ]; then
    echo "| $name | skipped: the ${BUDGET_S} s budget is spent | 0 |" >>"$TMP/head.md"
    FAILED+=("$name (not run)")
    continue
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "gpu_check: $name (up to ${limit} s) ..." >&2
  step_start=$(date +%s)
  command="$(step_command "$name")"
  command="${command//\$TMP/$TMP}"
  timeout --kill-after=5 "$limit" bash -c "$command" >"$TMP/$name.out" 2>"$TMP/$name.err"
  status=$?
  seconds=$(( $(date +%s) - step_start ))
  case "$status" in
    0) result="ok" ;;
    124|137) result="FAILED: over its ${limit} s"; FAILED+=("$name") ;;
    *) result="FAILED (exit $status)"; FAILED+=("$name") ;;
  esac
  echo "| $name | $result | $seconds |" >>"$TMP/head.md"
  {
    case "$name" in
      env|txt2img|attention|unet|vae) cat "$TMP/$name.out" ;;
      pytest-cuda) echo "## pytest -m cuda"; echo; echo '```'; tail -n 15 "$TMP/$name.out"; echo '```'; echo ;;
      train) echo "## Two training steps, bf16-mixed"; echo; echo '```'
             grep -oE "train/loss=[0-9.e+-]+" "$TMP/$name.out" | sort -u
             grep -iE "precision|AMP|steps this session|error" "$TMP/$name.err" | tail -n 8; echo '```'; echo ;;
    esac
    if [ "$status" != 0 ]; then
      echo "<details><summary>$name: stderr (last lines)</summary>"; echo; echo '```'; tail -n 25 "$TMP/$name.err"; echo '```'; echo "</details>"; echo
    fi
  } >>"$TMP/body.md"
done

{
  cat "$TMP/head.md"
  echo
  echo "Total $(( $(date +%s) - START )) s of a ${BUDGET_S} s budget."
  echo
  cat "$TMP/body.md"
} >"$OUT"
echo "gpu_check: wrote $OUT" >&2
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_check: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
echo "gpu_check: all ${#STEPS[@]} steps passed" >&2
exit 0
