#!/usr/bin/env bash
# Extract ONNX Runtime's C/C++ headers from Debian's libonnxruntime-dev package into DEST.
#
# The onnxruntime wheel ships no headers. Debian trixie packages ORT 1.21's headers; building against
# the oldest API we support lets the library run on ORT 1.21 and newer. The mirror is read from this
# machine's own apt sources, so no registry host is written into the repository.
#
# Usage: fetch_ort_headers.sh DEST   (DEST/onnxruntime_c_api.h exists afterwards)
set -euo pipefail
dest=${1:?usage: fetch_ort_headers.sh DEST}
suite=${SALR_ORT_DEBIAN_SUITE:-trixie}

if [[ -f "$dest/onnxruntime_c_api.h" ]]; then exit 0; fi

mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [[ -f "$f" ]] || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
  [[ -n "$mirror" ]] && break
done
if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
if [[ -z "$mirror" ]]; then
  echo "fetch_ort_headers: no Debian mirror found in /etc/apt; set ONNXRUNTIME_INCLUDE_DIR to an ORT release's include/ directory" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
echo "deb [trusted=yes] $mirror $suite main" > "$work/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Sandbox::User=root
          -o Debug::NoLocking=1)
apt-get "${apt_opts[@]}" update -qq
(cd "$work" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >/dev/null)
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$dest.tmp.$$"
cp -r "$work/root/usr/include/onnxruntime/." "$dest.tmp.$$/"
rm -rf "$dest"
mv "$dest.tmp.$$" "$dest"
echo "fetch_ort_headers: $(basename "$deb") -> $dest"
