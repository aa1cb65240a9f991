#!/usr/bin/env bash
# CUDA 13.0 toolchain from PyPI wheels, for `cargo build --features cuda` on a
# machine without a GPU or a system CUDA install (ours and CI's).
#
# Why wheels: the lent GPU machine runs driver 580 (CUDA 13.0). candle compiles
# its kernels to PTX that the driver JIT-compiles, and a driver refuses PTX
# from a newer nvcc, so the compiler must be exactly 13.0. PyPI has the 13.0
# compiler, headers and libraries as wheels (nvidia-cuda-nvcc and friends);
# they unpack into one CUDA-like tree, nvidia/cu13/{bin,include,lib,nvvm}.
#
# What it downloads (nothing else): the wheels pinned in WHEELS below, with
# `pip download --no-deps`, into .cuda/wheels (ignored by git), unpacked into
# .cuda/site. .cuda/cuda is then the CUDA root (CUDA_HOME).
#
# libcuda.so: no wheel ships it (it comes with the driver), but candle's cudarc
# links it (`dynamic-linking`). We build a stub: a small C library whose
# SONAME is libcuda.so.1 and which defines every driver entry point cudarc
# binds (names read from cudarc's own bindings in the cargo registry), each
# returning CUDA_ERROR_NO_DEVICE (100). It lives in .cuda/cuda/lib/stubs,
# where the link step finds it; the binary then records NEEDED libcuda.so.1,
# which the driver provides on the GPU machine. On a machine without a driver
# the stub can also be put on LD_LIBRARY_PATH so that the CUDA binary starts
# and reports "no CUDA device" instead of failing to load.
#
# Usage:
#   scripts/cuda-toolchain.sh                      # fetch + set up, print the env
#   scripts/cuda-toolchain.sh cargo build --features cuda --bins --benches
#   source scripts/cuda-toolchain.sh               # set the env in this shell
#
# Env it sets: CUDA_HOME (= CUDA_PATH, CUDA_ROOT), NVCC, PATH (+ $CUDA_HOME/bin),
# CUDA_COMPUTE_CAP=90 (H100/H200; override before calling), CUDARC_CUDA_VERSION
# =13000. It leaves CARGO_TARGET_DIR alone: use a separate one for CUDA builds
# so that the CPU build's artifacts are not rebuilt back and forth.
#
# Runtime on the GPU machine: the binary's NEEDED CUDA entries are
# libcuda.so.1 (driver), libcudart.so.13, libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libnvrtc.so.13 (the `readelf -d` check at the end lists
# them); benches/gpu/run.sh puts the machine's own copies (PyTorch's nvidia/cu13
# wheels) on LD_LIBRARY_PATH.

# Fetch and unpack the wheels and build the stub, once per wheel set (a
# stamp file records it). Runs in a subshell with errexit, also when sourced.
_cuda_toolchain_setup() (
    set -euo pipefail
    local repo="$1" dir="$2"
    # Pinned to the CUDA 13.0 releases (13.0 Update 2 where there is one).
    local WHEELS=(
        nvidia-cuda-nvcc==13.0.88
        nvidia-nvvm==13.0.88
        nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96
        nvidia-cuda-cccl==13.0.85
        nvidia-cuda-nvrtc==13.0.88
        nvidia-cublas==13.0.2.14
        nvidia-curand==10.4.0.35
    )
    local stamp
    stamp="$dir/.ready-$(printf '%s ' "${WHEELS[@]}" | sha256sum | cut -c1-16)"
    [[ -e "$stamp" ]] && exit 0
    echo "cuda-toolchain: fetching ${#WHEELS[@]} wheels into $dir/wheels" >&2
    rm -rf "$dir/site" "$dir/cuda" "$dir"/.ready-*
    mkdir -p "$dir/wheels" "$dir/site"
    python3 -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        -d "$dir/wheels" "${WHEELS[@]}"
    local w name
    for w in "${WHEELS[@]}"; do
        name="${w%%==*}"
        name="${name//-/_}-${w##*==}"
        unzip -q -o "$dir"/wheels/"$name"-*.whl 'nvidia/*' -d "$dir/site"
    done
    ln -sfn site/nvidia/cu13 "$dir/cuda"
    local root="$dir/cuda"
    chmod +x "$root"/bin/* "$root"/nvvm/bin/*
    # cudaforge (candle-kernels' build) looks for lib64; the linker wants
    # unversioned names (the wheels ship only the SONAME files).
    ln -sfn lib "$root/lib64"
    local so
    for so in cudart.so.13 cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13; do
        ln -sfn "lib$so" "$root/lib/lib${so%.so.*}.so"
    done
    _cuda_toolchain_stub "$repo" "$root/lib/stubs"
    touch "$stamp"
)

# Export the build environment into the current shell.
_cuda_toolchain_env() {
    local root
    root="$(cd "$1/cuda" && pwd -P)" || return 1
    export CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root"
    export NVCC="$root/bin/nvcc"
    export PATH="$root/bin:$PATH"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export CUDARC_CUDA_VERSION=13000
}

# Builds $2/libcuda.so (SONAME libcuda.so.1): one function per driver entry
# point that cudarc binds, each returning CUDA_ERROR_NO_DEVICE.
_cuda_toolchain_stub() {
    local repo="$1" out="$2"
    local manifest meta
    # Not --offline: on a machine whose cargo cache has never held the cuda
    # feature's crates (cudarc, candle-kernels), cargo fetches them here from
    # crates.io, as the build would anyway.
    meta="$(cd "$repo" && cargo metadata --format-version 1 --features cuda \
        --filter-platform x86_64-unknown-linux-gnu)" || {
        echo "cuda-toolchain: \`cargo metadata --features cuda\` failed (above); it needs crates.io to fetch cudarc" >&2
        return 1
    }
    manifest="$(python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))' <<<"$meta")"
    local bindings
    bindings="$(dirname "$manifest")/src/driver/sys/mod.rs"
    mkdir -p "$out"
    {
        echo "/* generated by scripts/cuda-toolchain.sh from $bindings: link stub only */"
        grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$bindings" | sed 's/^pub unsafe fn //' | sort -u \
            | sed 's/.*/int &(void) { return 100; }/'
    } >"$out/libcuda_stub.c"
    local n
    n="$(grep -c return "$out/libcuda_stub.c")"
    [[ "$n" -gt 100 ]] || { echo "cuda-toolchain: only $n driver symbols found in $bindings" >&2; return 1; }
    cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so" "$out/libcuda_stub.c"
    ln -sfn libcuda.so "$out/libcuda.so.1"
    echo "cuda-toolchain: libcuda.so stub with $n symbols in $out" >&2
}

_cuda_toolchain_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_cuda_toolchain_dir="${EPS2V_CUDA_DIR:-$_cuda_toolchain_repo/.cuda}"
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: set up, then export into the caller's shell.
    _cuda_toolchain_setup "$_cuda_toolchain_repo" "$_cuda_toolchain_dir" \
        && _cuda_toolchain_env "$_cuda_toolchain_dir"
else
    set -euo pipefail
    _cuda_toolchain_setup "$_cuda_toolchain_repo" "$_cuda_toolchain_dir"
    _cuda_toolchain_env "$_cuda_toolchain_dir"
    if [[ $# -gt 0 ]]; then
        exec "$@"
    fi
    echo "CUDA_HOME=$CUDA_HOME"
    echo "NVCC=$NVCC"
    echo "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
    echo "CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
    "$NVCC" --version | tail -2
fi
