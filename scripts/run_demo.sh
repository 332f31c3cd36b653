#!/usr/bin/env bash
# The main job on the bundled Shakespeare sample, from a fresh machine:
#   1. install fleetlm, 2. train a 4096-piece SentencePiece tokenizer on the sample,
#   3. tokenize the plays into .bin/.idx, 4. pretrain a 14M-parameter LLaMA on 2 processes
#   with a short eval every 50 steps, 5. plot the loss against the unigram entropy.
# Everything is written under demo_output/ (delete it to start over). Extra arguments go to
# run_pretrain.py, e.g. `bash scripts/run_demo.sh --max_steps 20`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Paddle's bundled MKL takes a slow fp32 GEMM path on AMD CPUs unless told the CPU type before
# it loads; measured 2.4x faster matmuls on the 2-core AMD development machine. Harmless elsewhere.
export MKL_DEBUG_CPU_TYPE="${MKL_DEBUG_CPU_TYPE:-5}"
NPROC="${NPROC:-2}"
OUT=demo_output

python -m pip install --quiet -e .

mkdir -p "$OUT/tokenizer" "$OUT/data"
if [ ! -f "$OUT/tokenizer/shakespeare.model" ]; then
  python data_tools/train_tokenizer.py --input_path examples/data/shakespeare \
    --vocab_size 4096 --output_prefix "$OUT/tokenizer/shakespeare"
fi
if [ ! -f "$OUT/data/shakespeare.idx" ]; then
  python data_tools/create_pretraining_data.py --input_path examples/data/shakespeare \
    --tokenizer_name_or_path "$OUT/tokenizer/shakespeare.model" --append_eos --workers 2 \
    --output_prefix "$OUT/data/shakespeare"
fi

resume=()
if ls -d "$OUT"/checkpoints/checkpoint-* >/dev/null 2>&1; then
  resume=(--resume_from_checkpoint true)  # continue an interrupted demo instead of refusing to overwrite it
fi
python -m paddle.distributed.launch --nproc_per_node "$NPROC" --log_dir "$OUT/log" \
  run_pretrain.py llama/pretrain_llama-15m-shakespeare-demo.json "${resume[@]}" "$@"

python scripts/plot_loss.py --output_dir "$OUT/checkpoints" --input_dir "$OUT/data/shakespeare" \
  --split 9,1 --png "$OUT/loss.png"
