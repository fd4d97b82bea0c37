#!/usr/bin/env bash
# Install tinylm (editable) with a CPU/CUDA torch pinned by constraints.txt.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # + test/reference deps (peft, bitsandbytes, openai, playwright, ...)
#                                  #   and Debian's chromium for the web-page test when apt is usable
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [[ "${1:-}" == "--dev" ]]; then extras="[dev]"; fi
"$PY" -m pip install -q -c constraints.txt -e ".${extras}"
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the web-page test will be skipped"
  else
    echo "setup: chromium not found (apt-get install chromium); the web-page test will be skipped"
  fi
fi
