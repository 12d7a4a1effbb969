#!/usr/bin/env bash
# One entry point for a fresh clone: sets up ./.venv (a CPU torch only when none is installed), then runs
#   ./dev.sh demo [args]   the demo: teaches the built-in demo model a new concept, shows it (CPU, about a minute)
#   ./dev.sh test [args]   the test suite (pytest; extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
venv_python=.venv/bin/python

# Install only when the project's requirements changed since the last install.
stamp=.venv/.loraloop-installed
want=$(cat pyproject.toml dev.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up .venv (first run takes a few minutes)..." >&2
    # torch belongs to the host; here we only need some torch. A CPU build keeps a fresh machine small.
    if ! "$venv_python" -c "import torch" 2>/dev/null; then
        "$venv_python" -m pip install -q "torch==2.13.0"
    fi
    "$venv_python" -m pip install -q -e ".[test]"
    # These two ship data/code we need but pin things we must not take (torchvision, old torch): no deps.
    #   open-clip-torch: the CLIP BPE vocabulary (offline tokenizer); stable-diffusion-sdkit: the original ldm UNet.
    "$venv_python" -m pip install -q --no-deps open-clip-torch stable-diffusion-sdkit
    echo "$want" > "$stamp"
fi

command=${1:-}
shift || true
case "$command" in
    demo) exec .venv/bin/loraloop demo "$@" ;;
    test) exec "$venv_python" -m pytest "$@" ;;
    *) echo "usage: ./dev.sh demo|test [args]" >&2; exit 2 ;;
esac
