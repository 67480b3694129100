#!/usr/bin/env bash
# llama.cpp for the tests, from the npm registry, in about a minute instead of the eight a whole
# build takes on 2 cores:
# - the source of llama.cpp's release v0.5.0 (node-llama-cpp ships it as a git bundle): its
#   converter and headers;
# - that release's libraries built for Linux x86-64 (@node-llama-cpp/linux-x64);
# - compiled here against those libraries: llama-quantize and llama-imatrix (the programs uspx
#   drives) and tests/llama_logits.c (the tests' own reference run).
# The result is a checkout with build/bin, the layout `--llama-cpp DIR` and $USPX_LLAMA_CPP take.
#
#   tests/llama_cpp.sh DEST
set -euo pipefail
dest=$(realpath -m "${1:?usage: tests/llama_cpp.sh DEST}")
version=3.22.1  # node-llama-cpp's version: llama.cpp release v0.5.0
here=$(cd "$(dirname "$0")" && pwd)
for tool in npm git cc c++; do
    if ! command -v "$tool" >/dev/null; then  # the tests that need llama.cpp then skip (and fail on CI)
        echo "tests/llama_cpp.sh: no $tool on this machine: llama.cpp is not set up" >&2
        exit 0
    fi
done

tmp=$(mktemp -d "${dest%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
packages=("node-llama-cpp@$version")
prebuilt=no
if [ "$(uname -sm)" = "Linux x86_64" ]; then
    packages+=("@node-llama-cpp/linux-x64@$version")
    prebuilt=yes
fi
npm pack --silent "${packages[@]}" >/dev/null
tar xzf "node-llama-cpp-$version.tgz" package/llama/gitRelease.bundle
git -c advice.detachedHead=false clone -q package/llama/gitRelease.bundle src
rm -rf src/.git

if [ "$prebuilt" = yes ]; then
    bin=src/build/bin
    mkdir -p "$bin"
    tar xzf "node-llama-cpp-linux-x64-$version.tgz" --strip-components=3 -C "$bin" package/bins/linux-x64
    rm "$bin/llama-addon.node"  # node's module: not needed
    flags=(-O2 -Isrc/include -Isrc/ggml/include -Isrc/common -Isrc/vendor)
    libs=(-L"$bin" -l:libllama-common.so -l:libllama.v0.5.0.so -l:libggml.v0.5.0.so -l:libggml-base.so
          -Wl,-rpath,'$ORIGIN' -pthread)
    c++ -std=c++17 "${flags[@]}" src/tools/quantize/quantize.cpp src/tools/quantize/main.cpp -o "$bin/llama-quantize" "${libs[@]}"
    c++ -std=c++17 "${flags[@]}" src/tools/imatrix/imatrix.cpp -o "$bin/llama-imatrix" "${libs[@]}"
    cc "${flags[@]}" "$here/llama_logits.c" -o "$bin/llama-logits" "${libs[@]}"
    "$bin/llama-quantize" --help >/dev/null 2>&1 || [ $? -eq 1 ]  # it loads: usage exits 1
else
    echo "tests/llama_cpp.sh: no prebuilt llama.cpp for $(uname -sm): the converter only; tests that run llama.cpp skip" >&2
fi

rm -rf "$dest"
mv src "$dest"
