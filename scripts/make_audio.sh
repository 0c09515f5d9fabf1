#!/usr/bin/env bash
# Regenerate the speech clips in include/audio/ (16 kHz, mono, 16-bit PCM WAV) and clips.json.
#
# Needs espeak-ng and sox (Debian: apt-get install -y espeak-ng sox). The clips are synthesized
# English speech with known reference text, so a Whisper model with real weights can be scored by
# word error rate. Output is deterministic for a given espeak-ng version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$here/include/audio}"
mkdir -p "$out"
for tool in espeak-ng sox soxi python3; do
  command -v "$tool" >/dev/null || { echo "make_audio.sh: $tool not found (apt-get install -y espeak-ng sox)" >&2; exit 2; }
done

# id|voice|words per minute|text
clips=(
  "clip01|en-us|160|The quick brown fox jumps over the lazy dog near the river bank."
  "clip02|en|150|Please verify that every graphics card stays below its thermal limit during the test."
  "clip03|en-us|170|Stable Diffusion turns a short text prompt into a five hundred and twelve pixel image."
  "clip04|en|155|The server has sixteen accelerator cards arranged in four groups of four."
  "clip05|en-us|165|Network traffic stayed within a few kilobytes while the models were running locally on the machine, which confirms that no data left the building."
  "clip06|en|150|Whisper transcribes recorded speech into written text for later review."
  "clip07|en-us|160|After the cool down phase, the idle cards returned to their resting temperature within a few minutes."
  "clip08|en|170|A certification run measures latency, temperature and power, then signs the results and stores them safely."
)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
manifest="$tmp/manifest.tsv"
: > "$manifest"
for entry in "${clips[@]}"; do
  IFS='|' read -r id voice wpm text <<< "$entry"
  espeak-ng -v "$voice" -s "$wpm" -w "$tmp/$id.raw.wav" "$text"
  sox "$tmp/$id.raw.wav" -r 16000 -c 1 -b 16 -e signed-integer "$out/$id.wav"
  dur="$(soxi -D "$out/$id.wav")"
  printf '%s\t%s\t%s\t%s\n' "$id.wav" "$voice" "$dur" "$text" >> "$manifest"
done

python3 - "$manifest" "$out/clips.json" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1], encoding="utf-8"):
    file, voice, dur, text = line.rstrip("\n").split("\t")
    rows.append({"file": file, "text": text, "duration_s": round(float(dur), 3),
                 "sample_rate": 16000, "channels": 1, "sample_width_bits": 16,
                 "voice": f"espeak-ng {voice}"})
json.dump({"generator": "scripts/make_audio.sh (espeak-ng + sox)", "clips": rows},
          open(sys.argv[2], "w", encoding="utf-8"), indent=2)
open(sys.argv[2], "a").write("\n")
PY
echo "wrote $(ls "$out"/*.wav | wc -l) clips to $out"
