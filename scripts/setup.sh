#!/usr/bin/env bash
# Set up a checkout: a .venv with craft-studio (editable) and its test tools, plus Chromium for the
# browser tests when it can be installed. Safe to re-run: every step is skipped or fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "setup: craft-studio needs Python >= 3.11; '$PYTHON' is $("$PYTHON" --version 2>&1)." \
             "Set PYTHON=/path/to/python3.11 and re-run." >&2
        exit 1
    fi
    echo "setup: creating .venv with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv .venv
fi

# torch/torchvision come from the package registry as ordinary dependencies (their default
# builds run on CPU and CUDA alike); the pip cache makes re-runs fast.
.venv/bin/python -m pip install --disable-pip-version-check -q -e '.[test]'

# The `image-reward` package with its own pins, in a side folder that only the ImageReward parity
# test puts on PYTHONPATH (it cannot be imported beside transformers 5; CRAFT ports its model).
REF=.venv/reference/imagereward
if [ ! -f "$REF/.complete" ]; then
    echo "setup: installing the image-reward reference code for the parity test ($REF)"
    rm -rf "$REF"
    .venv/bin/python -m pip install --disable-pip-version-check -q --no-deps --target "$REF" \
        image-reward==1.5 timm==0.6.13 fairscale==0.4.13 transformers==4.36.2 \
        tokenizers==0.15.2 huggingface-hub==0.20.3
    touch "$REF/.complete"
fi

# Browser tests drive the studio with the system Chromium (never `playwright install`).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium for the browser tests (apt-get)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
            echo "setup: warning: could not install chromium; browser tests will be skipped" >&2
        fi
    else
        echo "setup: note: chromium not found (install it as root: apt-get install chromium);" \
             "browser tests will be skipped" >&2
    fi
fi
echo "setup: done"
