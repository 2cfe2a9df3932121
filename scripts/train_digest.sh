#!/usr/bin/env bash
# Trains each config for one epoch with the `mamba` binary given and prints, per config, a hash
# of the weights it ends with and its validation line. Training on the CPU repeats bit for bit
# (the backward passes sum in a fixed order), so two builds compute the same function exactly
# when their digests are equal:
#   scripts/train_digest.sh MAMBA CONFIG... > digest.txt
# e.g. an old commit's binary against the current one, over the quick bundled configs:
#   scripts/train_digest.sh /tmp/old/mamba models/vision/mnist-vim.toml models/series/*.toml
# Extra `--set` overrides for every run go in TRAIN_DIGEST_SETS (space-separated).
set -euo pipefail
mamba="${1:?usage: scripts/train_digest.sh MAMBA CONFIG...}"
shift
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sets=(--set train.epochs=1)
for s in ${TRAIN_DIGEST_SETS:-}; do
    sets+=(--set "$s")
done
for config in "$@"; do
    out="$work/$(basename "$config" .toml)"
    validation="$("$mamba" train "$config" "${sets[@]}" --out "$out" 2>/dev/null | grep '^validation:')"
    echo "$config $(sha256sum < "$out/last/model.safetensors" | cut -c1-16) $validation"
done
