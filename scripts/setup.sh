#!/usr/bin/env bash
# Sets up everything this repository needs, idempotently and without a terminal:
#   1. a virtual environment in .venv with the pinned dependencies (requirements.txt)
#   2. WordNet 3.0 for NLTK (Debian's packages, or nltk.download elsewhere)
#   3. the embedded generator: a tiny Stable-Diffusion-architecture model in models/tiny-sd (and tiny
#      SDXL, SD3, PixArt-Sigma, FLUX.1 and SANA in models/tiny-<family>),
#      the clip-filter stage's tiny CLIP in models/tiny-clip (and tiny OpenCLIP in models/tiny-open-clip)
#      and prompt le's tiny T5 in models/tiny-t5
#   4. the fixture datasets for the embedded profile in data/fixtures
#   5. the digits profile's data (data/digits) and its generator, trained here on the digits'
#      train split (models/digits-sd; about two minutes on two cores)
#   6. vega, vega-lite and vega-embed from the npm registry (pinned, hash-checked) inlined in a page
#      template for `dvc plots show` (.venv/dvc-plots/), so that its plots draw offline
# Usage: bash scripts/setup.sh        (PYTHON=python3.12 bash scripts/setup.sh to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }
fail() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

pick_python() {
  for candidate in ${PYTHON:-} python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  fail "no Python >= 3.10 found; install python3.11 (Debian: apt-get install python3 python3-venv)"
}

# 1. Virtual environment and pinned packages (pip skips what is already installed).
if [ ! -x .venv/bin/python ]; then
  py=$(pick_python)
  say "creating .venv with $py"
  "$py" -m venv .venv || fail "could not create .venv; on Debian install python3-venv"
fi
say "installing pinned packages (requirements.txt)"
.venv/bin/python -m pip install --disable-pip-version-check -q -r requirements.txt
.venv/bin/python -m pip install --disable-pip-version-check -q --no-deps -e .

# 2. WordNet 3.0. On Debian, install the database packages if they are missing.
if ! .venv/bin/python -c 'from imagenet_sd.prompts.wordnet import reader; reader()' >/dev/null 2>&1; then
  if [ ! -f /usr/share/wordnet/index.sense ] && command -v apt-get >/dev/null 2>&1; then
    sudo_cmd=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo_cmd="sudo -n"
    if [ "$(id -u)" -eq 0 ] || [ -n "$sudo_cmd" ]; then
      say "installing Debian's wordnet-base and wordnet-sense-index"
      export DEBIAN_FRONTEND=noninteractive
      $sudo_cmd apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index >/dev/null 2>&1 ||
        { $sudo_cmd apt-get update -q >/dev/null 2>&1 &&
          $sudo_cmd apt-get install -y -q --no-install-recommends wordnet-base wordnet-sense-index >/dev/null; } ||
        say "apt-get could not install WordNet; trying nltk.download instead"
    fi
  fi
  .venv/bin/python -m imagenet_sd.prompts.wordnet install || fail "WordNet 3.0 could not be installed (see the line above)"
fi

# 3 to 5. Built locally and deterministically, as the outputs of the pipeline's first stage,
# embedded-assets: DVC builds them, or finds them current, and keeps them in its cache, from
# which queued experiments' copies of the repository get them. Outside a git clone (DVC needs
# one) they are built directly. Either way a step skips when already current.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # The stage's command runs `python`: this environment's, whether or not it is activated.
  PATH="$PWD/.venv/bin:$PATH" .venv/bin/dvc repro -q embedded-assets digits-assets
else
  .venv/bin/python -m imagenet_sd.models.embedded models/tiny-sd
  .venv/bin/python -m imagenet_sd.models.tiny_clip models/tiny-clip
  .venv/bin/python -m imagenet_sd.models.tiny_open_clip models/tiny-open-clip
  .venv/bin/python -m imagenet_sd.models.tiny_t5 models/tiny-t5
  .venv/bin/python -m imagenet_sd.models.tiny_families models
  .venv/bin/python -m imagenet_sd.datasets.fixtures data/fixtures
  PYTHONPATH=src .venv/bin/python stages/digits_assets.py --data data/digits --model models/digits-sd
fi

# 6. `dvc plots show` offline: DVC's page loads vega from a CDN, blank on a machine without internet.
# Not fatal: without it DVC keeps its own page (docs/training.md#log-and-plots).
if ! .venv/bin/python scripts/vendor_plots.py; then
  say "warning: vega could not be fetched from the npm registry; dvc plots show will load it from a CDN"
fi

say "done. Activate with: source .venv/bin/activate"
