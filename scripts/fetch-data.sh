#!/usr/bin/env bash
# Fetch Fashion-MNIST (Zalando Research, MIT/Expat) into data/fashion-mnist/ (or OUTDIR).
#
#   usage: scripts/fetch-data.sh [OUTDIR]
#
# Sources, in order:
#   1. ../shared/data/fashion-mnist/ next to the repository root, if present (copied);
#   2. the Debian package dataset-fashion-mnist: `apt-get download`, `dpkg-deb -x`, then
#      the four .gz files from /usr/share/datasets/fashion-mnist/ are copied unchanged.
#      Run `apt-get update` once first if apt-get cannot find the package.
# Set FASHION_SOURCE=apt to skip the shared copy.
#
# Every file is checked by the MD5 of its DECOMPRESSED bytes (the canonical
# Fashion-MNIST checksums); the script exits non-zero on any mismatch and leaves no
# unverified file behind. MNIST itself is bundled in data/mnist/ and needs no fetch.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$repo/data/fashion-mnist}
shared=$(cd "$repo/.." && pwd)/shared/data/fashion-mnist

FILES=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)
declare -A MD5=(
  [train-images-idx3-ubyte]=f4a8712d7a061bf5bd6d2ca38dc4d50a
  [train-labels-idx1-ubyte]=9018921c3c673c538a1fc5bad174d6f9
  [t10k-images-idx3-ubyte]=8181f5470baa50b63fa0f6fddb340f0a
  [t10k-labels-idx1-ubyte]=15d484375f8d13e6eb1aabb0c3f46965
)

die() { echo "fetch-data: error: $*" >&2; exit 1; }
for tool in gzip md5sum; do
  command -v "$tool" >/dev/null || die "'$tool' is required but not installed"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Copies the four .gz files from folder $1 into $work/stage and verifies them.
stage_from() {
  local src=$1 f got
  rm -rf "$work/stage"
  mkdir -p "$work/stage"
  for f in "${FILES[@]}"; do
    [[ -f $src/$f.gz ]] || die "$src/$f.gz is missing"
    cp "$src/$f.gz" "$work/stage/$f.gz"
    chmod 644 "$work/stage/$f.gz"
    got=$(gzip -dc "$work/stage/$f.gz" | md5sum | cut -d' ' -f1) \
      || die "$src/$f.gz does not decompress"
    [[ $got == "${MD5[$f]}" ]] \
      || die "$src/$f.gz: MD5 of the decompressed file is $got, expected ${MD5[$f]}"
  done
}

if [[ ${FASHION_SOURCE:-} != apt && -d $shared ]]; then
  echo "fetch-data: copying Fashion-MNIST from $shared"
  stage_from "$shared"
else
  command -v apt-get >/dev/null || die "apt-get not found and no shared copy at $shared"
  command -v dpkg-deb >/dev/null || die "dpkg-deb not found and no shared copy at $shared"
  echo "fetch-data: downloading Debian package dataset-fashion-mnist"
  (cd "$work" && apt-get download dataset-fashion-mnist) \
    || die "apt-get download dataset-fashion-mnist failed; run 'apt-get update' first (as root)"
  debs=("$work"/dataset-fashion-mnist_*.deb)
  [[ -f ${debs[0]} ]] || die "apt-get download produced no dataset-fashion-mnist_*.deb"
  dpkg-deb -x "${debs[0]}" "$work/deb" || die "dpkg-deb -x ${debs[0]} failed"
  stage_from "$work/deb/usr/share/datasets/fashion-mnist"
fi

mkdir -p "$out"
for f in "${FILES[@]}"; do
  mv "$work/stage/$f.gz" "$out/$f.gz"
done
echo "fetch-data: 4 files verified (MD5 of decompressed bytes) -> $out"
