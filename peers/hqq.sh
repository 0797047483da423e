#!/usr/bin/env bash
# HQQ, group size 64, at 4, 3 and 2 bits (or the bits given), through the real hqq package (0.2.8.post1)
# in its own environment. Data-free.
#   bash peers/hqq.sh smollm2-135m         ->  peers/out/smollm2-135m-hqq-w{4,3,2}g64
source "$(dirname "$0")/env.sh"
MODEL=${1:?usage: bash peers/hqq.sh MODEL [BITS ...]}
shift
SOURCE=$(model_dir "$MODEL")
PY=$(peer_env hqq hqq==0.2.8.post1 transformers==5.24.0)
for BITS in ${@:-4 3 2}; do
  DIR="$OUT/$MODEL-hqq-w${BITS}g64"
  [ -f "$DIR/aecompress-peer.json" ] && { echo "$DIR: done already"; continue; }
  "$PY" "$ROOT/peers/hqq_quantize.py" --model "$SOURCE" --bits "$BITS" --group-size 64 --out "$DIR"
done
