#!/bin/sh
# Stage 2 of the nsfast test VM: PID 1 in the final root (overlay over the
# host's root), run as `/run/nsfast/busybox sh /run/nsfast/stage2.sh`.
#
# Finishes the system setup (sysfs, pure cgroup v2 with all controllers
# delegated from the root, devpts, /dev/shm, lo), runs the job with its output
# going to the second serial port (ttyS1 = the host script's stdout), then
# writes the exit marker to the console (ttyS0) and powers off.

N=/run/nsfast
bb=$N/busybox
# Use busybox's applets for everything here, not the host's tools.
if ! "$bb" mkdir -p "$N/bin" || ! "$bb" --install -s "$N/bin"; then
    echo "NSFAST_VM_ERROR: stage2: cannot install busybox applets"
    "$bb" poweroff -f
fi
export PATH="$N/bin"

fail() {
    echo "NSFAST_VM_ERROR: stage2: $*"
    poweroff -f
    sleep 5
    exit 1
}

mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || fail "cannot mount sysfs"
mount -t cgroup2 -o nsdelegate none /sys/fs/cgroup || fail "cannot mount cgroup2"
# Enable every available controller for the root's children.
# shellcheck disable=SC2013  # the file holds one line of words
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control ||
        echo "nsfast-vm: warning: cannot enable cgroup controller $c"
done

mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts || fail "cannot mount devpts"
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || fail "cannot mount /dev/shm"
# What udev/systemd would normally create.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

ip link set lo up || fail "cannot bring lo up"
hostname nsfast-vm

# The job's stdout+stderr go through a pipe (so the command sees a pipe, as it
# would under CI on the host, not a tty) that `cat` copies to ttyS1.  ttyS1 is
# set raw so "\n" is not turned into "\r\n".
mkfifo "$N/out" || fail "mkfifo failed"
{
    stty raw -echo <&1
    exec cat "$N/out"
} >/dev/ttyS1 &
catpid=$!

# New session, so that whatever the job leaves behind can be told apart from
# us below.  /bin/sh is the host's shell; the environment is exactly what the
# job script sets.  (Run in the background and `wait`ed for, because for a
# foreground command killed by a signal ash would print "Killed" into the
# output.)
setsid env -i /bin/sh "$N/run" </dev/null >"$N/out" 2>&1 &
wait $!
rc=$?

# Kill anything the job left running (it could hold the pipe open forever):
# every process outside our own session, except kernel threads (children of
# kthreadd, PID 2).
# /proc/PID/stat is "pid (comm) state ppid pgrp session ..."; comm may hold
# spaces, hence the split after the last ") ".
# shellcheck disable=SC2086  # word splitting is intended
kill_leftovers() {
    read -r s </proc/1/stat
    set -- ${s##*) }
    mysid=$4
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        read -r s <"$d/stat" 2>/dev/null || continue
        set -- ${s##*) }
        # $2 = ppid, $4 = session
        if [ "$pid" != 2 ] && [ "$2" != 2 ] && [ "$4" != "$mysid" ]; then
            kill -KILL "$pid" 2>/dev/null
        fi
    done
}
kill_leftovers
# cat exits at EOF; its close of ttyS1 (the last one) waits for the UART to
# drain, so all output has reached the host once it is gone.
wait "$catpid"

# Same for the console: drop our own handles on it so that the marker's write
# is the last close, which drains it before we power off.
exec </dev/null >/dev/null 2>&1
echo "NSFAST_VM_EXIT=$rc" >/dev/ttyS0
poweroff -f
