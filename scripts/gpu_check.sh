#!/usr/bin/env bash
# One command for the GPU machine (issue 11): builds danlu for that GPU, checks that CUDA runs, runs every CUDA
# test case, runs every CUDA kernel under compute-sanitizer, benchmarks, and writes one summary.
#
#   [DANLU_GIT_COMMIT=<hash>] scripts/gpu_check.sh [--cpu] OUTDIR [STAGE...]
#
# (The device machine's copy of the working tree has no .git: DANLU_GIT_COMMIT names the commit there.)
# Stages, in this order (default: all but bench-optim-full; `check` is added before any stage that needs CUDA,
# and `summary` always runs last):
#   build             pip install --no-build-isolation --no-deps . with DANLU_CUDA=ON DANLU_CUDA_ARCHS=90-real
#                     (the H200's architecture only) on every core (CMAKE_BUILD_PARALLEL_LEVEL=nproc)
#   check             torch.cuda.is_available() and danlu.cuda_available(), the build's info; stops the run
#                     with a clear message when CUDA cannot run
#   tests             every CUDA case of tests/ (scripts/pytest_cuda_cases.py selects them) with
#                     DANLU_REQUIRE_CUDA=1, so a CUDA case that skips fails
#   sanitizer         scripts/cuda_kernel_driver.py once with PyTorch references, then under compute-sanitizer
#                     memcheck, racecheck, synccheck and initcheck (without references: fewer kernels to
#                     instrument), each with its own time limit
#   bench             python -m benchmarks --device cuda --quick
#   bench-optim-full  python -m benchmarks --device cuda --only optim (the full optimizer cases; not by default)
#   summary           OUTDIR/summary.json: device, driver, torch, CUDA, danlu commit, date, and per stage the
#                     result, seconds and log
#
# --cpu is the dry run for a machine without a GPU: build and check as above (check then reports what is missing
# and the run goes on), tests only collects the CUDA cases, sanitizer runs the driver on the CPU kernels, bench
# runs --smoke on the CPU. GPU_CHECK_TIMEOUT_SCALE multiplies every time limit (a 2-core machine needs about 4).
#
# Files: OUTDIR gets build.log, check.log, tests.log, sanitizer.log, bench.log (+ bench.tar.gz with the
# harness's results), summary.json: at most 8 files, all that the device tool brings back from $OUT. Nothing
# else is written outside OUTDIR except the package install and its build folder (build/, ignored by git and
# reused by a second run on the same machine). The summary of an earlier run in the same OUTDIR is kept for
# the stages this run does not repeat.
#
# Time limits. The whole default run must fit in 8 minutes, so that a second, partial run (STAGE...) still fits
# in a 15-minute device lease with the machine's start; the limits below add up to 450 s. Measured on the 2-core
# CPU machine (2026-12-04, under load from other work):
#   build     the sm_90-only build is ~200 CPU-seconds in all (the two large .cu files are ~50 CPU-s each, the
#             longest single jobs); on 16 cores ~15 s of parallel work behind a ~50 s critical path, plus pip
#             and CMake: ~60 s expected                                                        -> limit 90 s
#   check     import torch, CUDA initialisation, one dropout kernel: ~10 s                     -> limit 30 s
#   tests     355 CUDA cases; their 279 CPU twins take 47 CPU-seconds here, the 76 CPU-vs-CUDA cases add as
#             much again; on the GPU the kernels are fast but every case synchronises: ~60-80 s -> limit 100 s
#   sanitizer the driver's 500 cases take 25 s on the CPU without references (45 s with); natively on the
#             H200 a few seconds, under a sanitizer several times that plus instrumenting each kernel at its
#             first launch. memcheck, racecheck and synccheck instrument danlu's kernels only (torch's run
#             as they are); initcheck must see torch's writes too, so it instruments everything:
#             reference run 25 s, memcheck 45 s, racecheck 30 s (the families that use shared memory),
#             synccheck 25 s, initcheck 45 s                                                  -> 170 s in all
#   bench     --quick is 98 timed implementations of 0.2-1.5 s each; on a GPU the spread is small, so
#             most stop near 0.2 s: ~40 s                                                      -> limit 60 s
# A stage that runs out of time is marked "timeout" and the next stage runs; every log shows how far it got.
set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

CPU_MODE=0
if [[ "${1:-}" == "--cpu" ]]; then CPU_MODE=1; shift; fi
[[ $# -ge 1 && "$1" != -* ]] || usage
OUTDIR=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
shift
cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}

ALL_STAGES=(build check tests sanitizer bench bench-optim-full summary)
DEFAULT_STAGES=(build check tests sanitizer bench summary)
declare -A LIMIT=([build]=90 [check]=30 [tests]=100 [bench]=60 [bench-optim-full]=240
                  [reference]=25 [memcheck]=45 [racecheck]=30 [synccheck]=25 [initcheck]=45)
declare -A STATUS SECONDS_TAKEN DETAIL

stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=("${DEFAULT_STAGES[@]}")
for s in "${stages[@]}"; do
  [[ " ${ALL_STAGES[*]} " == *" $s "* ]] || { echo "gpu_check: unknown stage '$s' (stages: ${ALL_STAGES[*]})" >&2; exit 2; }
done
wanted() { [[ " ${stages[*]} " == *" $1 "* ]]; }
for s in tests sanitizer bench bench-optim-full; do
  if wanted "$s" && ! wanted check; then stages=(check "${stages[@]}"); fi
done

export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DANLU_HYPOTHESIS_PROFILE=ci
# The device machine gets a copy of the working tree without .git: the caller names the commit.
DANLU_GIT_COMMIT=${DANLU_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
export DANLU_GIT_COMMIT
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
RUN_START=$(date +%s)

limit() { awk -v s="$1" -v k="$SCALE" 'BEGIN { printf "%d", s * k + 0.5 }'; }

# run_step NAME LOG LIMIT_SECONDS CMD...: runs CMD with a time limit, appending to LOG; sets STEP_RC.
run_step() {
  local name=$1 log=$2 seconds; seconds=$(limit "$3"); shift 3
  {
    echo "=== $name: $* (limit ${seconds} s) ==="
    date -u +"started %Y-%m-%dT%H:%M:%SZ"
  } >>"$log"
  local start; start=$(date +%s)
  timeout --kill-after=10 "$seconds" "$@" >>"$log" 2>&1
  STEP_RC=$?
  echo "=== $name: exit $STEP_RC after $(( $(date +%s) - start )) s ===" >>"$log"
  echo "  $name: exit $STEP_RC after $(( $(date +%s) - start )) s (limit ${seconds} s)"
}

# record STAGE START RC [DETAIL]
record() {
  local rc=$3
  STATUS[$1]=$([[ $rc -eq 0 ]] && echo pass || { [[ $rc -eq 124 || $rc -eq 137 ]] && echo timeout || echo fail; })
  SECONDS_TAKEN[$1]=$(( $(date +%s) - $2 ))
  DETAIL[$1]=${4:-}
  echo "gpu_check: $1 ${STATUS[$1]} (${SECONDS_TAKEN[$1]} s)${4:+: $4}"
}

skip() { STATUS[$1]=skipped; SECONDS_TAKEN[$1]=0; DETAIL[$1]=$2; echo "gpu_check: $1 skipped: $2"; }

stage_build() {
  local start; start=$(date +%s)
  : >"$OUTDIR/build.log"
  DANLU_CUDA=${DANLU_CUDA:-ON} DANLU_CUDA_ARCHS=${DANLU_CUDA_ARCHS:-90-real} \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    run_step build "$OUTDIR/build.log" "${LIMIT[build]}" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --no-cache-dir -v "$REPO"
  record build "$start" "$STEP_RC" "$(grep -m3 -- '-- danlu' "$OUTDIR/build.log" | sed 's/^ *-- //' | paste -sd';' -)"
}

stage_check() {
  local start; start=$(date +%s)
  : >"$OUTDIR/check.log"
  run_step check "$OUTDIR/check.log" "${LIMIT[check]}" "$PYTHON" - "$CPU_MODE" <<'EOF'
import sys
import torch
import danlu
from danlu import _C

info = _C.build_info()
print("danlu build:", info)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuda.is_available():", torch.cuda.is_available())
print("danlu.cuda_available():", danlu.cuda_available())
problems = []
if not info["cuda"]:
    problems.append("danlu was built without CUDA kernels (build stage: DANLU_CUDA=ON, nvcc on PATH)")
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
elif not danlu.cuda_available():
    problems.append("danlu's CUDA runtime sees no device (driver older than the CUDA it was built with?)")
if not problems:
    name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"device: {name}, sm_{cap[0]}{cap[1]}")
    if not any(a.startswith(f"{cap[0]}{cap[1]}") for a in info["cuda_archs"]):
        problems.append(f"danlu was built for {info['cuda_archs']}, not for this GPU's sm_{cap[0]}{cap[1]}")
    x = torch.randn(1001, device="cuda")  # one danlu kernel, end to end
    y = danlu.functional.dropout(x, 0.5, True)
    torch.cuda.synchronize()
    assert bool(((y == 0) | (y == x * 2)).all()), "dropout on CUDA gave wrong values"
if problems:
    print("CUDA cannot run here:\n  " + "\n  ".join(problems))
    sys.exit(0 if sys.argv[1] == "1" else 3)
print("CUDA ok")
EOF
  local rc=$STEP_RC
  local why; why=$(awk '/^CUDA cannot run here/ { on = 1; next } on && /^  / { sub(/^ +/, ""); print }' \
    "$OUTDIR/check.log" | paste -sd';' -)
  [[ $CPU_MODE -eq 1 && -n "$why" ]] && why="dry run (--cpu): $why"
  record check "$start" "$rc" "${why:-CUDA ok}"
  if [[ $rc -ne 0 ]]; then
    echo "gpu_check: CUDA cannot run here, so the CUDA stages are skipped: ${why:-see $OUTDIR/check.log}" >&2
    return 1
  fi
}

stage_tests() {
  local start; start=$(date +%s)
  : >"$OUTDIR/tests.log"
  local args=(-m pytest tests -p pytest_cuda_cases -p no:cacheprovider -q -rfE) require=1
  if [[ $CPU_MODE -eq 1 ]]; then
    args+=(--collect-only)  # no GPU: show the selection only
    require=0
  fi
  PYTHONPATH="$REPO/scripts${PYTHONPATH:+:$PYTHONPATH}" DANLU_REQUIRE_CUDA=$require \
    run_step tests "$OUTDIR/tests.log" "${LIMIT[tests]}" "$PYTHON" "${args[@]}"
  local rc=$STEP_RC
  if [[ $CPU_MODE -eq 1 && $rc -eq 0 ]] && ! grep -Eq '^[1-9][0-9]*/[0-9]+ tests collected' "$OUTDIR/tests.log"; then
    rc=1  # not one CUDA case selected: the plugin or the suite is broken
  fi
  record tests "$start" "$rc" "$(grep -E '(passed|failed|error|collected)' "$OUTDIR/tests.log" | tail -1)"
}

stage_sanitizer() {
  local start; start=$(date +%s)
  local log="$OUTDIR/sanitizer.log" driver="$REPO/scripts/cuda_kernel_driver.py" failed=() rc=0
  : >"$log"
  if [[ $CPU_MODE -eq 1 ]]; then
    run_step driver "$log" "${LIMIT[reference]}" "$PYTHON" "$driver" --device cpu
    rc=$STEP_RC
    record sanitizer "$start" "$rc" "dry run (--cpu): the driver on the CPU kernels, no compute-sanitizer"
    return
  fi
  run_step reference "$log" "${LIMIT[reference]}" "$PYTHON" "$driver" --device cuda
  [[ $STEP_RC -eq 0 ]] || failed+=("reference:$STEP_RC")
  local sanitizer; sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [[ -z "$sanitizer" ]]; then
    record sanitizer "$start" 1 "compute-sanitizer not found"
    return
  fi
  # Without torch's caching allocator every tensor is its own allocation, so memcheck sees an access past a
  # tensor's end instead of a read of the cached block's neighbour.
  local tool families only_danlu=()
  "$sanitizer" --help 2>/dev/null | grep -q -- '--kernel-name ' && only_danlu=(--kernel-name kns=danlu)
  for tool in memcheck racecheck synccheck initcheck; do
    families=optim,batchnorm,dropout
    [[ $tool == racecheck ]] && families=optim,batchnorm  # dropout has no shared memory to race on
    local filter=("${only_danlu[@]}")
    [[ $tool == initcheck ]] && filter=()  # it must see torch's kernels write what danlu's then read
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step "$tool" "$log" "${LIMIT[$tool]}" \
      "$sanitizer" --tool "$tool" --error-exitcode 99 --print-limit 20 "${filter[@]}" \
      "$PYTHON" "$driver" --device cuda --no-reference --only "$families"
    [[ $STEP_RC -eq 0 ]] || failed+=("$tool:$STEP_RC")
  done
  [[ ${#failed[@]} -eq 0 ]] || rc=1
  record sanitizer "$start" "$rc" "${failed[*]:-memcheck, racecheck, synccheck, initcheck clean}"
}

stage_bench() {  # stage_bench NAME ARGS...
  local name=$1 start; start=$(date +%s); shift
  local out="$SCRATCH/$name"
  : >"$OUTDIR/$name.log"
  local device=cuda
  [[ $CPU_MODE -eq 1 ]] && { device=cpu; set -- --smoke; }
  run_step "$name" "$OUTDIR/$name.log" "${LIMIT[$name]}" "$PYTHON" -m benchmarks --device "$device" "$@" --out "$out"
  local rc=$STEP_RC
  [[ -d "$out" ]] && tar -czf "$OUTDIR/$name.tar.gz" -C "$SCRATCH" "$name"
  record "$name" "$start" "$rc" "$([[ -d "$out" ]] && echo "results in $name.tar.gz")"
}

stage_summary() {
  local args=() s
  for s in "${ALL_STAGES[@]}"; do
    [[ -n "${STATUS[$s]:-}" ]] || continue
    local log="$s.log"
    [[ ${STATUS[$s]} == skipped ]] && log=""
    args+=("$s" "${STATUS[$s]}" "${SECONDS_TAKEN[$s]}" "$log" "${DETAIL[$s]}")
  done
  "$PYTHON" - "$OUTDIR/summary.json" "$REPO" "$CPU_MODE" "$(( $(date +%s) - RUN_START ))" "${args[@]}" <<'EOF'
import datetime, json, os, platform, shutil, subprocess, sys

path, repo, cpu_mode, total = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
rows = sys.argv[5:]

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=repo).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

summary = {"stages": {}}
if os.path.exists(path):  # an earlier run into this OUTDIR: its other stages stay
    with open(path) as f:
        summary["stages"] = json.load(f).get("stages", {})
for i in range(0, len(rows), 5):
    name, status, seconds, log, detail = rows[i:i + 5]
    summary["stages"][name] = {"status": status, "seconds": int(seconds), "log": log or None, "detail": detail}
gpu = run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
summary["device"] = gpu.splitlines()[0].split(", ")[0] if gpu else None
summary["driver"] = gpu.splitlines()[0].split(", ")[1] if gpu else None
summary["gpus"] = gpu.splitlines() if gpu else []
try:
    import torch
    summary["torch"] = torch.__version__
    summary["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        summary["device"] = torch.cuda.get_device_name()
except Exception as error:  # noqa: BLE001 (the summary is written whatever broke)
    summary["torch"] = f"not importable: {error}"
try:
    from danlu import _C
    summary["danlu"] = _C.build_info()
except Exception as error:  # noqa: BLE001
    summary["danlu"] = f"not importable: {error}"
nvcc = run("nvcc", "--version")
summary["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
built = summary["danlu"] if isinstance(summary["danlu"], dict) else {}
summary["commit"] = os.environ.get("DANLU_GIT_COMMIT") or run("git", "rev-parse", "HEAD") or built.get("commit")
summary["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
summary["host"] = platform.node()
summary["cpus"] = os.cpu_count()
summary["dry_run_cpu"] = cpu_mode
summary["seconds_this_run"] = total
summary["compute_sanitizer"] = shutil.which("compute-sanitizer")
# A stage is skipped only after build or check failed, and those count.
summary["passed"] = all(s["status"] in ("pass", "skipped") for s in summary["stages"].values())
with open(path, "w") as f:
    json.dump(summary, f, indent=2, default=str)
print(json.dumps({k: summary[k] for k in ("device", "driver", "torch", "commit", "passed")}))
for name, s in summary["stages"].items():
    print(f"  {name:17} {s['status']:8} {s['seconds']:4d} s  {s['detail']}")
sys.exit(0 if summary["passed"] else 1)
EOF
}

echo "gpu_check: stages ${stages[*]} -> $OUTDIR$([[ $CPU_MODE -eq 1 ]] && echo ' (dry run on the CPU)')"
cuda_ok=1
for s in "${ALL_STAGES[@]}"; do
  wanted "$s" || continue
  case $s in
    build) stage_build
           [[ ${STATUS[build]} == pass ]] || cuda_ok=0 ;;
    check) if [[ $cuda_ok -eq 1 ]]; then stage_check || cuda_ok=0; else skip check "build failed"; fi ;;
    tests|sanitizer|bench|bench-optim-full)
      if [[ $cuda_ok -eq 0 ]]; then
        skip "$s" "check failed: CUDA cannot run here (see check.log), or the build failed"
        continue
      fi
      case $s in
        tests) stage_tests ;;
        sanitizer) stage_sanitizer ;;
        bench) stage_bench bench --quick ;;
        bench-optim-full) stage_bench bench-optim-full --only optim ;;
      esac ;;
  esac
done
stage_summary
