#!/bin/sh
# Build a small root filesystem from Debian's busybox-static: `make-busybox-rootfs.sh DIR`.
# Used by the tests and the README's walkthrough. Idempotent; installs busybox-static
# with apt-get when /bin/busybox is missing.
set -eu
dir=${1:?usage: make-busybox-rootfs.sh DIR}
bb=/bin/busybox
if ! "$bb" --list >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
case "$(file -b "$bb" 2>/dev/null || echo static)" in
    *dynamically*) echo "make-busybox-rootfs: $bb is not static (install busybox-static)" >&2; exit 1 ;;
esac
mkdir -p "$dir/bin" "$dir/proc" "$dir/dev" "$dir/tmp" "$dir/etc" "$dir/root" "$dir/sys"
cp "$bb" "$dir/bin/busybox"
for applet in $("$bb" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$dir/etc/passwd"
printf 'root:x:0:\n' > "$dir/etc/group"
echo "$dir"
