#!/usr/bin/env bash
# Creates the Python environment of the benchmarks: a venv at /work/main/.bench-venv (or
# $BENCH_VENV) with PyTorch (CPU use only), sentence-transformers and psutil, at the exact
# versions of bench/requirements.txt. Run by hand, not by CI:
#
#   bash bench/setup-python.sh
#
# Idempotent: when every pinned package is already installed at its pinned version, it only
# checks the imports and prints the versions. Needs python3 (3.11) and PyPI; about 4.8 GB of
# disk (3 GB of it nvidia-* libraries that PyPI's torch wheel loads at import even on a CPU
# machine; see the comment at the top of requirements.txt).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
venv=${BENCH_VENV:-"$repo/.bench-venv"}
req="$here/requirements.txt"
py=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "creating venv $venv with $($py --version 2>&1)"
  "$py" -m venv "$venv"
fi
vpy="$venv/bin/python"

# Prints the requirements that are missing or at another version; exits 1 if there are any.
check_pins() {
  "$vpy" - "$req" <<'PY'
import sys, re
from importlib import metadata
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    name, want = re.split(r"==", line)
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        bad.append(f"{name}=={want} (installed: {have or 'none'})")
if bad:
    print(f"{len(bad)} package(s) to install: " + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else ""))
    sys.exit(1)
PY
}

if check_pins; then
  echo "all pinned packages already installed in $venv"
else
  start=$(date +%s)
  # --no-deps: requirements.txt pins the whole closure (without triton, see there).
  "$vpy" -m pip install --disable-pip-version-check --no-deps --progress-bar off -r "$req"
  echo "installed in $(($(date +%s) - start)) s"
  check_pins
fi

# ONNX Runtime for bench/ort_embed.py (bench/run.sh --parts quant).
"$vpy" -m pip install --disable-pip-version-check --progress-bar off -q -r "$here/requirements-ort.txt"

# Offline: the Hugging Face hub is not reachable, and the model is a local folder.
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$vpy" - <<'PY'
import platform, sys
import torch, transformers, sentence_transformers, tokenizers, numpy, psutil
print(f"python               {platform.python_version()} ({sys.executable})")
print(f"torch                {torch.__version__} (threads {torch.get_num_threads()}, "
      f"MKL {torch.backends.mkl.is_available()}, oneDNN {torch.backends.mkldnn.is_available()}, "
      f"CUDA available {torch.cuda.is_available()})")
print(f"transformers         {transformers.__version__}")
print(f"sentence-transformers {sentence_transformers.__version__}")
print(f"tokenizers           {tokenizers.__version__}")
print(f"numpy                {numpy.__version__}")
print(f"psutil               {psutil.__version__}")
x = torch.randn(64, 64)
assert torch.allclose(x @ torch.eye(64), x), "torch matmul check failed"
PY
echo "venv size: $(du -sh "$venv" | cut -f1)"
