#!/usr/bin/env bash
# The device check in one command, for a bare GPU machine (README "Benchmarks"):
#
#     bash benchmarks/device_check.sh [module args, e.g. --quick]
#
# 1. installs the project as the README says, timed:
#        python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]'
#    (at most DEVICE_CHECK_INSTALL_TIMEOUT seconds, default 150; skipped when .venv exists,
#    which is then used: this is not a bare machine, and an existing environment is not touched);
# 2. if that install failed (a machine with no package index, say), runs with the machine's own
#    python3 instead, plus any wheels carried in ./.whl (installed with --no-index --no-deps into
#    a temporary folder, e.g. diffusers and importlib_metadata for the diffusers column); the
#    sections that need a missing package say so in the table;
# 3. runs `python -m benchmarks.device_check` with the rest of the 8-minute budget; the JSON goes
#    to $OUT/device_check.json when OUT is set, else ./device_check.json, the table beside it
#    (.txt), the install's output to install.log and everything printed to device_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
log="$out_dir/device_check.log"
total_s=470                        # the whole command, install included: under 8 minutes
start=$(date +%s)

if [ -e .venv ]; then
    install_note="skipped: .venv exists (not a bare machine); using it"
    py=.venv/bin/python
    install_s=0
else
    t0=$(date +%s.%N)
    limit="${DEVICE_CHECK_INSTALL_TIMEOUT:-150}"   # each step its own child of timeout
    if timeout "$limit" python3 -m venv .venv >"$out_dir/install.log" 2>&1 &&
        timeout "$limit" .venv/bin/pip install -c constraints.txt -e '.[test]' \
            >>"$out_dir/install.log" 2>&1; then
        install_note="ok (README command)"
        py=.venv/bin/python
    else
        rc=$?
        last=$(tail -n 1 "$out_dir/install.log" | tr -d '"\\' | cut -c1-160)
        install_note="failed (exit $rc: $last); ran with $(command -v python3)"
        py=python3
        rm -rf .venv           # half-made: the dvc section links .venv to the running Python
        if compgen -G ".whl/*.whl" >/dev/null; then
            site=$(mktemp -d /tmp/device-check-site.XXXX)
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$site" .whl/*.whl >>"$out_dir/install.log" 2>&1 \
                && export PYTHONPATH="$site" \
                && install_note="$install_note + wheels of .whl"
        fi
    fi
    install_s=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
fi
echo "device_check.sh: install ${install_s} s: $install_note" | tee "$log"

left=$(( total_s - ($(date +%s) - start) - 30 ))   # 30 s: start-up, the last section's end
[ "$left" -lt 120 ] && left=120
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout $(( left + 20 )) "$py" -m benchmarks.device_check --out "$out_dir/device_check.json" \
    --budget "$left" --install-s "$install_s" --install-note "$install_note" "$@" 2>&1 \
    | tee -a "$log"
