#!/bin/sh
# Build a small OCI image layout from the busybox root of make-busybox-rootfs.sh with umoci:
# `make-busybox-image.sh DIR` makes DIR (tag `latest`, Cmd `sh`, Env PATH=/bin, WorkingDir
# /root). Used by the README. Remakes DIR when it exists.
set -eu
dir=${1:?usage: make-busybox-image.sh DIR}
here=$(dirname "$0")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$dir"
umoci init --layout "$dir"
umoci new --image "$dir:latest"
umoci unpack --rootless --image "$dir:latest" "$work/bundle" >/dev/null
"$here/make-busybox-rootfs.sh" "$work/bundle/rootfs" >/dev/null
umoci repack --image "$dir:latest" "$work/bundle"
umoci config --image "$dir:latest" --config.cmd=sh --config.env=PATH=/bin --config.workingdir=/root
umoci gc --layout "$dir"
echo "$dir"
