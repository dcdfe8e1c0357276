#!/bin/sh
# Stage 1 of the nsfast test VM: PID 1 inside the initramfs (busybox sh).
#
# Builds the VM's final root -- a writable overlayfs whose lower layer is the
# host's root filesystem, shared read-only over virtio-9p, and whose upper
# layer is a tmpfs -- and switch_root's into it.  The final root must be a real
# mount (not the initramfs rootfs), otherwise pivot_root(2) in the code under
# test would fail with EINVAL.  Stage 2 (stage2.sh) then runs the job.
#
# Files provided by the host (see run-vm.sh):
#   /bin/busybox (+ applet symlinks), /stage2.sh, /modules/*.ko, /modules.order
#   /job/run   shell script running the user's command (env, cd, exec)
#   /job/cwd   the host's current directory

export PATH=/bin

# Any failure here is a VM failure: report it on the console (which the host
# shows on failure) and power off without an exit marker.
fail() {
    echo "NSFAST_VM_ERROR: init: $*"
    poweroff -f
    sleep 5
    exit 1
}

mkdir -p /dev /proc /sys
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs"
mount -t proc proc /proc || fail "cannot mount proc"

# Modules, in dependency order (only those not built into this kernel).
while read -r mod; do
    insmod "/modules/$mod.ko" || fail "insmod $mod failed"
done </modules.order

# /nr holds the overlay's layers; /nr/root becomes the final root.
R=/nr/root
mkdir -p /nr
mount -t tmpfs -o mode=0755 nsfast-vm /nr || fail "cannot mount tmpfs"
mkdir -p /nr/lower /nr/upper /nr/work "$R"
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose \
    hostroot /nr/lower || fail "cannot mount the host root over 9p"
mount -t overlay -o lowerdir=/nr/lower,upperdir=/nr/upper,workdir=/nr/work \
    overlay "$R" || fail "cannot mount the overlay root"

cwd=$(cat /job/cwd)

# /tmp and /run get fresh tmpfs mounts below.  If the host's cwd lives under
# one of them, keep a handle on it (a bind mount of the overlay's view) and put
# it back on top afterwards, so the command still finds its cwd.
keep_cwd=
case $cwd in
/tmp/* | /run/*)
    if [ -d "$R$cwd" ]; then
        mkdir -p /keep-cwd
        mount --bind "$R$cwd" /keep-cwd && keep_cwd=1
    fi
    ;;
esac

for d in dev proc sys tmp run; do mkdir -p "$R/$d"; done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp" || fail "cannot mount /tmp"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$R/run" || fail "cannot mount /run"
if [ -n "$keep_cwd" ]; then
    if ! mkdir -p "$R$cwd" || ! mount --move /keep-cwd "$R$cwd"; then
        fail "cannot restore the cwd $cwd"
    fi
fi

# Stage 2 runs from /run/nsfast in the final root (the initramfs is freed by
# switch_root), with its own busybox so it does not depend on the host's tools.
mkdir -p "$R/run/nsfast"
cp /bin/busybox /stage2.sh /job/run "$R/run/nsfast/" || fail "cannot copy stage 2"

mount --move /dev "$R/dev" || fail "cannot move /dev"
mount --move /proc "$R/proc" || fail "cannot move /proc"

exec switch_root "$R" /run/nsfast/busybox sh /run/nsfast/stage2.sh
fail "switch_root failed"
