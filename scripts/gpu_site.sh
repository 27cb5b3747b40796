#!/usr/bin/env bash
# Python packages the GPU machine lacks, unpacked into .gpu/site for `benchmarks/gpu_session.sh` (which puts that
# folder on PYTHONPATH there). Run here, once per checkout, then name .gpu in the device call's `carry`:
#   bash scripts/gpu_site.sh            # bitsandbytes (nf4 / int8), at the version constraints.txt pins
#   bash scripts/gpu_site.sh trl        # also TRL and the datasets stack it imports (benchmarks/vs_trl.py)
# The machine runs Python 3.12 with torch for CUDA 13.0: wheels are fetched for that, and bitsandbytes keeps only
# its CUDA 13.0 library (4.5 MiB instead of 41: a device call carries at most 64 MiB). .gpu/ is kept out of git
# through .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
pin() {  # NAME==VERSION: constraints.txt's pin, else the version this checkout's .venv holds
  grep -i "^$1==" constraints.txt | head -1 && return
  [ -x .venv/bin/python ] && .venv/bin/python -m pip show "$1" 2>/dev/null | awk -v n="$1" '/^Version:/ {print n "==" $2}'
}
wanted=("$(pin bitsandbytes)")
if [ "${1:-}" = trl ]; then
  wanted+=("$(pin trl)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)")
fi
for w in "${wanted[@]}"; do [ -n "$w" ] || { echo "gpu_site: a package is neither pinned in constraints.txt nor in .venv"; exit 1; }; done
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/wheels .gpu/site && mkdir -p .gpu/wheels .gpu/site
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels "${wanted[@]}"
for whl in .gpu/wheels/*.whl; do python3 -m zipfile -e "$whl" .gpu/site; done
rm -rf .gpu/wheels
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cuda130.so' ! -name '*_cpu.so' -delete
du -sh .gpu/site
