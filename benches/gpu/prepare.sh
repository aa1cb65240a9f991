#!/usr/bin/env bash
# Prepares, on this machine, everything benches/gpu/run.sh needs on the lent
# GPU machine (which has no Rust, no registry and no network):
#   .gpu/eps2v.xz  the x86-64 CUDA build (scripts/cuda-toolchain.sh, CUDA
#                13.0, sm_90), stripped (`--strip-all`), its NEEDED entries
#                checked against what the GPU machine provides, xz'd: the
#                device call carries at most 64 MiB in all (the tracked tree
#                alone is ~41 MB) and the binary is ~98 MB (33 MB of it
#                candle's CUDA kernels), ~15 MB as xz -9e (gzip -6: 29 MB,
#                which no longer fit beside the tree); run.sh unpacks it
#                there (xz, else Python's lzma);
#   .whl/        the diffusers wheel (not in the machine's image; its other
#                requirements are: KINDS.md's package list).
# Both folders are git-ignored; the device call carries them:
#   run(command="benches/gpu/run.sh", carry=[".gpu", ".whl"], timeout_s=330)
#
# Uses $CARGO_TARGET_DIR (default: target). Use a folder of its own for CUDA
# builds, e.g. CARGO_TARGET_DIR=~/.cache/eps2v-target-cuda: the cuda feature
# rebuilds candle, and sharing the CPU build's folder would rebuild back and
# forth.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIFFUSERS_VERSION=0.42.1
# What the GPU machine's image provides (driver: libcuda; PyTorch's nvidia
# cu13 wheels: the rest; Ubuntu 24.04: libc and libstdc++).
ALLOWED='^(libcuda\.so\.1|libcudart\.so\.13|libcublas\.so\.13|libcublasLt\.so\.13|libcurand\.so\.10|libnvrtc\.so\.13|libstdc\+\+\.so\.6|libgcc_s\.so\.1|libm\.so\.6|libc\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|ld-linux-x86-64\.so\.2)$'
MAX_GLIBC=2.39

target="${CARGO_TARGET_DIR:-target}"
scripts/cuda-toolchain.sh cargo build --features cuda --bin eps2v
mkdir -p .gpu
rm -f .gpu/eps2v
cp "$target/debug/eps2v" .gpu/eps2v.tmp
strip --strip-all .gpu/eps2v.tmp
mv .gpu/eps2v.tmp .gpu/eps2v

needed="$(readelf -d .gpu/eps2v | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
echo "NEEDED entries of .gpu/eps2v:"
echo "$needed" | sed 's/^/  /'
bad="$(echo "$needed" | grep -Ev "$ALLOWED" || true)"
if [[ -n "$bad" ]]; then
    echo "prepare.sh: libraries the GPU machine may not have: $bad" >&2
    exit 1
fi
glibc="$(objdump -T .gpu/eps2v | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)"
echo "newest glibc symbol version: $glibc (GPU machine: $MAX_GLIBC)"
if [[ "$(printf '%s\n%s\n' "$glibc" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]]; then
    echo "prepare.sh: the binary needs glibc $glibc, newer than the GPU machine's" >&2
    exit 1
fi

rm -f .gpu/eps2v.gz
xz -9e -T2 -c .gpu/eps2v >.gpu/eps2v.xz.tmp
mv .gpu/eps2v.xz.tmp .gpu/eps2v.xz
rm .gpu/eps2v

mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==$DIFFUSERS_VERSION"
# The device call carries the working tree (tracked + untracked files) and
# these two folders, 64 MiB in all.
carried=$(( $(du -cb .gpu/eps2v.xz .whl/diffusers-"$DIFFUSERS_VERSION"-*.whl | tail -1 | cut -f1) \
    + $(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1) ))
echo "carried with the working tree: $((carried / 1048576)) MiB (limit 64 MiB)"
# The device tool refuses more than 64 MiB; 2 MiB are kept spare (60 MiB
# until stop 43, when the tree and the binary reached 60.0).
if (( carried > 62 * 1048576 )); then
    echo "prepare.sh: too much to carry ($carried bytes)" >&2
    exit 1
fi
