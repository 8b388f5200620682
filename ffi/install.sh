#!/usr/bin/env bash
# Builds libdwcp and installs it under PREFIX: lib/libdwcp.{so,a},
# include/dwcp.h and lib/pkgconfig/dwcp.pc.
#   ffi/install.sh [--debug] PREFIX
# Then: PKG_CONFIG_PATH=PREFIX/lib/pkgconfig cc app.c $(pkg-config --cflags --libs dwcp)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = "--debug" ]; then
  profile=debug
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: ffi/install.sh [--debug] PREFIX" >&2
  exit 2
fi
prefix=$(realpath -m "$1")
if [ "$profile" = release ]; then
  cargo build --locked --release -p dwcp-ffi --lib
else
  cargo build --locked -p dwcp-ffi --lib
fi
target=${CARGO_TARGET_DIR:-target}
version=$(cargo pkgid -p dwcp-ffi | sed 's/.*[#@]//')
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0755 "$target/$profile/libdwcp.so" "$prefix/lib/"
install -m 0644 "$target/$profile/libdwcp.a" "$prefix/lib/"
install -m 0644 ffi/include/dwcp.h "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" ffi/dwcp.pc.in \
  > "$prefix/lib/pkgconfig/dwcp.pc"
echo "installed libdwcp $version ($profile) under $prefix"
