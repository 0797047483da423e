#!/usr/bin/env bash
# GPTQ, group size 64, at 4, 3 and 2 bits (or the bits given), through the real packages in their own
# environment: gptqmodel 7.6.0 for causal LMs, llm-compressor 0.14.0.1 for encoders (gptqmodel has no BERT).
#   bash peers/gptq.sh smollm2-135m        ->  peers/out/smollm2-135m-gptq-w{4,3,2}g64
#   bash peers/gptq.sh minilm-l6 4
source "$(dirname "$0")/env.sh"
MODEL=${1:?usage: bash peers/gptq.sh MODEL [BITS ...]}
shift
SOURCE=$(model_dir "$MODEL")
TEXT=$(calibration_text)
if [ "$(model_kind "$MODEL")" = causal_lm ]; then
  PY=$(peer_env gptqmodel gptqmodel==7.6.0)
  SCRIPT=gptq_quantize.py
else
  PY=$(peer_env llmcompressor llmcompressor==0.14.0.1)
  SCRIPT=gptq_encoder_quantize.py
fi
for BITS in ${@:-4 3 2}; do
  DIR="$OUT/$MODEL-gptq-w${BITS}g64"
  [ -f "$DIR/aecompress-peer.json" ] && { echo "$DIR: done already"; continue; }
  "$PY" "$ROOT/peers/$SCRIPT" --model "$SOURCE" --bits "$BITS" --group-size 64 --calibration "$TEXT" --out "$DIR"
done
