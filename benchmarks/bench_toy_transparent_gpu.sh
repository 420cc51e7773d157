#!/usr/bin/env bash
# Stage B of the toy transparent model (the RGB video base, layerkit train) on a GPU: four runs at
# once, as a session with one borrowed H200 for 15 minutes would use it. Prints each run's step
# rate per epoch (docs/benchmarks.md). Needs a finished stage A and T (toy/train.py --until T) in
# $FROM; run from the repo root:
#   FROM=runs/toy_transparent LIMIT=470 benchmarks/bench_toy_transparent_gpu.sh
set -u
FROM=${FROM:-runs/toy_transparent}; LIMIT=${LIMIT:-470}; R=${R:-/tmp/bench_toy_b}
VARIANTS=${VARIANTS:-"s100_n3000:1.0:3000 s100_n6000:1.0:6000 s100_n9000:1.0:9000 s050_n9000:0.5:9000"}
for stage in stage_a stage_t; do
  [ -d "$FROM/$stage" ] || { echo "$FROM/$stage is missing: run toy/train.py --out $FROM --until T first." >&2; exit 2; }
done
mkdir -p "$R"
for v in $VARIANTS; do
  IFS=: read -r name share steps <<< "$v"
  mkdir -p "$R/$name" && cp -r "$FROM/stage_a" "$FROM/stage_t" "$R/$name/"
  ( s=$(date +%s); timeout "$LIMIT" python -m layerkit_plugins.transparent.toy.train --out "$R/$name" --steps-b "$steps" \
      --reference-share-b "$share" --until B --accelerator gpu --threads 2 > "$R/$name.log" 2>&1
    echo "rc $? wall $(( $(date +%s) - s )) s" >> "$R/$name.log" ) &
done
wait
for v in $VARIANTS; do
  IFS=: read -r name _ _ <<< "$v"
  echo "== $name: $(tail -1 "$R/$name.log")"
  tr '\r' '\n' < "$R/$name.log" | grep -E "^Epoch [0-9]+: 100%" | awk '!seen[$2]++' | cut -c1-80
done
