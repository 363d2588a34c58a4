# Shared by image/lock and image/build. Sourced, not run.
# shellcheck disable=SC2034  # sourced: the variables are used by the scripts that source it
# shellcheck shell=bash

SUITE=trixie
ARCH=amd64
# Where Debian's packages come from when the lock is refreshed or a locked .deb is fetched.
MIRROR="${ZHULI_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${ZHULI_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# Content-addressed cache of locked .debs (by sha256): keeps an image rebuildable after the
# archive has moved on. Kept outside the checkout so clones and CI runs share it.
DEB_CACHE="${ZHULI_DEB_CACHE:-/var/cache/zhuli-image/debs}"

IMAGE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "image: $*" >&2; exit 1; }
note() { echo "image: $*" >&2; }

need() {
  local missing=()
  for c in "$@"; do command -v "$c" >/dev/null || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] || die "missing commands: ${missing[*]} (install: apt-get install mmdebstrap apt-utils qemu-system-x86 ovmf)"
}

# Names from a package list file, without comments.
list_packages() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$1" | tr -s '[:space:]' '\n' | sed '/^$/d'; }

# Fetch every .deb a lock names into the cache (verified by sha256). Fails naming what to do
# when a locked version is in neither the cache nor the archive.
fill_cache() {
  local lock="$1" unavailable=0 name version sha size url
  mkdir -p "$DEB_CACHE"
  while read -r kind name version sha size url; do
    [ "$kind" = pkg ] || continue
    [ -s "$DEB_CACHE/$sha.deb" ] && continue
    local tmp="$DEB_CACHE/.partial.$sha"
    if curl -fsS --retry 3 -o "$tmp" "$url" && [ "$(sha256sum "$tmp" | cut -d' ' -f1)" = "$sha" ]; then
      mv "$tmp" "$DEB_CACHE/$sha.deb"
    else
      rm -f "$tmp"
      echo "image: $name $version (sha256 $sha) is in neither the cache ($DEB_CACHE) nor the archive ($url)" >&2
      unavailable=$((unavailable + 1))
    fi
  done <"$lock"
  [ "$unavailable" -eq 0 ] || die "$unavailable locked package(s) unavailable; the archive has moved on. Run image/lock --refresh to lock its current versions (review the diff), or restore the cache"
}

# An apt repository (suite $SUITE, component main) of exactly the locked .debs, hard-linked from
# the cache. Use it as: deb [trusted=yes] file://REPO $SUITE main
make_repo() {
  local lock="$1" repo="$2" name version sha size url
  rm -rf "$repo" && mkdir -p "$repo/pool" "$repo/dists/$SUITE/main/binary-$ARCH"
  while read -r kind name version sha size url; do
    [ "$kind" = pkg ] || continue
    ln "$DEB_CACHE/$sha.deb" "$repo/pool/$(basename "$url")" 2>/dev/null \
      || cp "$DEB_CACHE/$sha.deb" "$repo/pool/$(basename "$url")"
  done <"$lock"
  (cd "$repo" && apt-ftparchive packages pool >"dists/$SUITE/main/binary-$ARCH/Packages" 2>/dev/null \
    && apt-ftparchive -o "APT::FTPArchive::Release::Suite=$SUITE" -o "APT::FTPArchive::Release::Codename=$SUITE" \
      -o "APT::FTPArchive::Release::Architectures=$ARCH" -o APT::FTPArchive::Release::Components=main \
      release "dists/$SUITE" >"$repo/Release.tmp" && mv "$repo/Release.tmp" "dists/$SUITE/Release") \
    || die "apt-ftparchive failed in $repo"
}

lock_value() { awk -v k="$2" '$1 == k { print $2 }' "$1"; }
