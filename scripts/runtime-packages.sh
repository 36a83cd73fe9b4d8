#!/usr/bin/env bash
# The distribution packages that provide the shared libraries the given binaries load (besides
# libc and the CUDA toolkit's, which the runtime image brings), one name per line. The image's
# runtime stage installs these instead of copying library files, so they stay under the
# distribution's updates and licenses:  scripts/runtime-packages.sh build/server/kvcompact-server
set -euo pipefail
ldd "$@" | awk '/=> \//{print $3}' | sort -u |
  grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so|/libcuda\.so|/usr/local/cuda' |
  while read -r lib; do
    # usrmerge: a library is registered under /lib or /usr/lib; try both spellings.
    owner=$(dpkg -S "$lib" 2>/dev/null || dpkg -S "$(realpath "$lib")" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null) || {
      echo "no package provides $lib" >&2
      exit 1
    }
    echo "${owner%%:*}"
  done | sort -u
