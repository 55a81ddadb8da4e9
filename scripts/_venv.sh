# Sourced by scripts/test and scripts/narrow-gate: create the virtual environment on the
# first run and install tl_vlm into it (torch first, pinned to the CPU build: an
# unpinned torch would pull several GB of CUDA packages).
VENV="${TL_VLM_VENV:-.venv}"
LOG="$VENV.install.log"
pip_install() {  # quiet, but show the log if it fails
    "$VENV/bin/pip" install -q "$@" >>"$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    pip_install --upgrade pip
fi
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
"$VENV/bin/python" -c "import tl_vlm, pytest, dadapy, nbclient, sphinx, myst_nb, furo, nbconvert" \
    2>/dev/null || pip_install -e ".[test]"
