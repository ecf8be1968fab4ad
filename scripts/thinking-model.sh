#!/usr/bin/env bash
# Makes the test model for thinking: the default model's weights with a chat template that has a
# thinking mode (tests/fixtures/thinking-template.jinja: the generation prompt opens `<think>`,
# or closes an empty thought when `enable_thinking` is false). The weights never think on their
# own, so everything they write lands in the open thought: what the tests check is the path
# from template to `reasoning_content`, not the model's wisdom. Prints the file's path.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${PARLANCE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/parlance}/models"
src="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
out="$cache/smollm2-thinking-test.gguf"
[ -f "$src" ] || { echo "the default model is missing: run parlance pull" >&2; exit 1; }
if [ ! -f "$out" ] || [ tests/fixtures/thinking-template.jinja -nt "$out" ]; then
  python3 -m pip install -q --disable-pip-version-check "gguf==0.19.0" >&2
  python3 -m gguf.scripts.gguf_new_metadata --chat-template "$(cat tests/fixtures/thinking-template.jinja)" \
    "$src" "$out.tmp" >&2 </dev/null
  mv "$out.tmp" "$out"
fi
echo "$out"
