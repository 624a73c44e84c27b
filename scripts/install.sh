#!/usr/bin/env bash
# Installs hf_vgrefine from this checkout, plus the Debian package with the open MRI data (Colin27 + AAL)
# that the offline VGMED `atlas` configuration and the demo are built from.
#   bash scripts/install.sh          # library + demo
#   bash scripts/install.sh --test   # ... + test dependencies
# The torch pin in constraints-cpu.txt selects the small CPU build; on a GPU machine set
# HF_VGREFINE_TORCH_CONSTRAINTS="" to keep (or let pip choose) your own torch and transformers (setup.cfg allows
# torch>=2.4, transformers>=5.0,<6); the file also pins the transformers release the model-type sweep classifies.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! dpkg -s mricron-data >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends mricron-data
fi

constraints="${HF_VGREFINE_TORCH_CONSTRAINTS-constraints-cpu.txt}"
extra=""
if [ "${1:-}" = "--test" ]; then extra="[test]"; fi
pip_args=(install -q -e ".${extra}")
if [ -n "$constraints" ]; then pip_args+=(-c "$constraints"); fi
python -m pip "${pip_args[@]}"
# post-install: grounding_ratio metric + offline VGMED atlas into the HF cache ($HF_HOME), so that
# evaluate.load("grounding_ratio") and load_dataset("vgmed") work offline from any directory (idempotent)
hf-vgrefine setup --quiet
