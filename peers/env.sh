# Sourced by the peer scripts: each peer's own environment, and the model and text aecompress uses.
# A peer runs in peers/.envs/<peer>, never in aecompress's .venv: their pins clash with ours.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OURS="$ROOT/.venv/bin/python"
OUT="$ROOT/peers/out"
[ -x "$OURS" ] || { echo "peers: error: $OURS is missing; run the README's set-up first" >&2; exit 2; }
mkdir -p "$OUT"

# peer_env NAME PIP-ARGS...: the peer's python, its environment built once (torch first, so pip keeps that build).
peer_env() {
  local name=$1; shift
  local env="$ROOT/peers/.envs/$name"
  if [ ! -f "$env/.ready" ]; then
    rm -rf "$env" && python3 -m venv "$env" >&2
    "$env/bin/pip" install -q torch==2.13.0 >&2 && "$env/bin/pip" install -q "$@" >&2
    touch "$env/.ready"
  fi
  echo "$env/bin/python"
}

# model_dir NAME: the local float32 directory aecompress reads for a model name (packaged names converted once).
model_dir() { "$OURS" -c "import sys; from aecompress.formats.sources import resolve; print(resolve(sys.argv[1]))" "$1"; }

# model_kind NAME: causal_lm, masked_lm or encoder, as aecompress tells them.
model_kind() {
  "$OURS" -c "import sys, transformers; from aecompress.formats.sources import auto_class_name, resolve
kind = auto_class_name(resolve(sys.argv[1]), 'auto')
print({'AutoModelForCausalLM': 'causal_lm', 'AutoModelForMaskedLM': 'masked_lm'}.get(kind, 'encoder'))" "$1"
}

# calibration_text: the text aecompress calibrates on (data spec 'calibration'), as a UTF-8 file; its path.
calibration_text() {
  local path="$OUT/calibration.txt"
  [ -s "$path" ] || "$OURS" -c "import sys; from aecompress.data.corpora import documents
open(sys.argv[1], 'w', encoding='utf-8').write('\n\n'.join(documents('calibration')))" "$path"
  echo "$path"
}
