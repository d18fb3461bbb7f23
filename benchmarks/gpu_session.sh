#!/usr/bin/env bash
# Issue 8's GPU measurements in one call of a lent device (its limits: 10 min a command, 15 min
# of device time a session, 8 files back), most wanted first:
#
#   benchmarks/gpu_session.sh OUT_DIR            # on the GPU: Qwen3-1.7B shape, bf16, no PyTorch side
#   benchmarks/gpu_session.sh OUT_DIR --quick    # CPU smoke test: tiny shape, same parts and files
#
# Parts, each its own process (XLA_FLAGS must be set before jax is imported):
#   sft_default  plain LoRA SFT step, B=8 x 1024, remat dots, XLA's defaults, profiled (the MFU
#                row: 23.8% on 2026-11-23); greedy decode B=1 and 8 against the HBM peak
#   sft_dsf      the same step with --xla_gpu_enable_dynamic_slice_fusion=true, profiled: does XLA
#                fuse the layer scan's weight slices into the GEMMs (13% of the step were copies)?
#   diffmas4     DiffMAS B=4, trace_grad stop and full (not measured on a GPU since chunk
#                attention began to recompute its scores in the backward, 2026-12-03)
# All parts share one deadline (DEADLINE_S, default 540 s), so the call ends inside the device
# tool's limit; a part cut short keeps the rows it finished (bench_gpu saves after each row), and
# a part with under MIN_PART_S (90 s) left is skipped and says so. PARTS picks and orders the parts
# (default: all three, as listed). OUT_DIR gets each part's
# gpu_*_<part>.json/.md and session.log (appended to, never overwritten): 7 files. Exit status 1 when
# a part failed (a deadline stop is not a failure). Profiles' raw traces stay in a temporary folder;
# their per-kernel summaries are in the JSON rows.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0;; "") usage >&2; echo "error: no OUT_DIR given" >&2; exit 2;; esac
out=$1; shift
quick=()
case "${1:-}" in "") ;; --quick) quick=(--quick); shift;; *) echo "error: unknown option '$1' (only --quick)" >&2; exit 2;; esac
[ $# -eq 0 ] || { echo "error: unexpected arguments: $*" >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
deadline_s=${DEADLINE_S:-540}
min_part_s=${MIN_PART_S:-90}
parts=${PARTS:-sft_default sft_dsf diffmas4}
for p in $parts; do
  case "$p" in sft_default|sft_dsf|diffmas4) ;; *) echo "error: unknown part '$p' in PARTS (sft_default, sft_dsf, diffmas4)" >&2; exit 2;; esac
done
# --quick: the tiny shape and bench_gpu's one repeat; on the GPU three repeats a row.
if [ ${#quick[@]} -gt 0 ]; then shape=(--shape tiny); reps=(); else shape=(--shape qwen3-1.7b); reps=(--repeats 3); fi
mkdir -p "$out"
prof=$(mktemp -d)
log="$out/session.log"
start=$(date +%s)
failures=0
note() { echo "[gpu_session $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
note "OUT_DIR=$out deadline ${deadline_s}s ${quick[*]:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } >> "$log"

# part NAME XLA_FLAGS bench_gpu-args...: runs bench_gpu.py under what is left of the deadline.
part() {
  local name=$1 flags=$2; shift 2
  local left=$(( deadline_s - ($(date +%s) - start) ))
  if [ "$left" -lt "$min_part_s" ]; then note "$name: skipped, ${left}s left of the deadline"; return 0; fi
  note "$name: XLA_FLAGS='$flags', ${left}s left"
  local rc=0
  XLA_FLAGS=$flags timeout -k 10 "$left" "$py" "$here/bench_gpu.py" "${shape[@]}" "${quick[@]}" "${reps[@]}" --skip-torch \
    --out "$out" --label "$name" "$@" >> "$log" 2>&1 || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then note "$name: stopped at the deadline (rows finished so far are kept)"
  elif [ "$rc" -ne 0 ]; then note "$name: exit $rc (see above)"; failures=$(( failures + 1 )); else note "$name: done"; fi
}

for p in $parts; do
  case "$p" in
    sft_default) part sft_default "${XLA_FLAGS:-}" --cases sft8 --remat dots --attention xla --decode-batches 1,8 \
                   --profile "$prof/sft_default";;
    sft_dsf) part sft_dsf "${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_dynamic_slice_fusion=true" --cases sft8 \
               --remat dots --attention xla --decode-batches= --profile "$prof/sft_dsf";;
    diffmas4) part diffmas4 "${XLA_FLAGS:-}" --cases diffmas4 --modes stop,full --decode-batches=;;
  esac
done
rm -rf "$prof"
note "finished in $(( $(date +%s) - start ))s, $failures part(s) failed; files: $(cd "$out" && ls | tr '\n' ' ')"
[ "$failures" -eq 0 ]
