# Sourced by scripts/test, scripts/narrow-gate, scripts/docs and scripts/verify-checkpoint:
# create the virtual environment and install tl_vlm into it, pinned to the versions the
# test suite last passed on (constraints.txt), torch first (the CPU build: an unpinned
# torch would pull several GB of CUDA packages).
#
#   TL_VLM_VENV         the environment's folder (default .venv)
#   TL_VLM_CONSTRAINTS  the constraints file (default constraints.txt); empty: install the
#                       newest releases pyproject.toml allows (scripts/test --latest)
#   TL_VLM_EXTRA_PINS   extra requirement specs installed with it, e.g. "transformers==5.23.0"
#
# The environment is (re)installed whenever pyproject.toml, the constraints or the extra
# pins changed since it was last installed (a stamp file in the venv records them), so a
# pull that moves the lock also moves the .venv. Each stage says one line on stderr.
VENV="${TL_VLM_VENV:-.venv}"
CONSTRAINTS="${TL_VLM_CONSTRAINTS-constraints.txt}"
EXTRA_PINS="${TL_VLM_EXTRA_PINS:-}"
LOG="$VENV.install.log"
say() { echo "[setup] $*" >&2; }
pip_install() {  # quiet, but show the log if it fails
    "$VENV/bin/pip" install -q "$@" >>"$LOG" 2>&1 || { cat "$LOG" >&2; say "install failed (log: $LOG)"; exit 1; }
}
constraint_args=()
if [ -n "$CONSTRAINTS" ]; then
    [ -f "$CONSTRAINTS" ] || { say "no constraints file $CONSTRAINTS"; exit 1; }
    constraint_args=(-c "$CONSTRAINTS")
fi
# shellcheck disable=SC2206
extra_pins=($EXTRA_PINS)
stamp="$VENV/.tl_vlm-installed"
wanted="$(cat pyproject.toml ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1) ${CONSTRAINTS:-newest} ${EXTRA_PINS}"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV (first run: about 3 minutes with a warm pip cache; log: $LOG)"
    python3 -m venv "$VENV"
    pip_install --upgrade pip
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ] || [ -n "${TL_VLM_REINSTALL:-}" ]; then
    if [ -n "$CONSTRAINTS" ]; then
        say "installing torch (CPU build), pinned by $CONSTRAINTS ..."
        pip_install "${constraint_args[@]}" torch "${extra_pins[@]}"
        say "installing tl_vlm and its test extras, pinned by $CONSTRAINTS ..."
        pip_install "${constraint_args[@]}" -e ".[test]" "${extra_pins[@]}"
    else
        # Newest releases of everything but torch, which stays at the tested CPU build
        # unless TL_VLM_TORCH says otherwise (torch's newest may be a CUDA build).
        torch_spec="${TL_VLM_TORCH:-$(grep -E '^torch==' constraints.txt || echo torch)}"
        say "installing $torch_spec ..."
        pip_install "$torch_spec"
        say "installing the newest releases of tl_vlm's dependencies ${EXTRA_PINS:+(with $EXTRA_PINS) }..."
        pip_install --upgrade --upgrade-strategy eager -e ".[test]" "$torch_spec" "${extra_pins[@]}"
    fi
    echo "$wanted" >"$stamp"
    say "ready: $("$VENV/bin/python" -c 'import importlib.metadata as m; print(", ".join(f"{p} {m.version(p)}" for p in ("torch", "transformers", "transformer-lens")))')"
fi
