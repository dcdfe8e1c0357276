#!/usr/bin/env bash
# Run a command inside a small throwaway qemu VM whose cgroups are pure v2.
#
#   tests/vm/run-vm.sh [--timeout SECONDS] [--mem SIZE] -- CMD [ARGS...]
#   tests/vm/run-vm.sh --prepare
#
# The VM boots Debian's stock kernel (linux-image-amd64) with a busybox
# initramfs, sees the host's root filesystem (read-only over virtio-9p, made
# writable by an overlayfs with a tmpfs upper layer, so writes are thrown away)
# and runs `CMD ARGS` as root in the host's current directory, with the host's
# PATH/HOME/Python-related environment.  CMD's stdout and stderr (merged) are
# streamed to this script's stdout and its exit status becomes ours.
#
# If the VM itself fails (no kernel, boot failure, timeout, ...) we exit 125
# with a message on stderr.  See tests/vm/README.md for the details.
#
# Environment:
#   NSFAST_VM_CACHE  cache directory (default: <repo>/.cache/vm)
#   NSFAST_VM_DEBUG  if set to 1: verbose kernel console, dumped to stderr
set -euo pipefail

readonly VM_FAIL=125
SELF_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SELF_DIR/../.." && pwd)
CACHE=${NSFAST_VM_CACHE:-$REPO/.cache/vm}
# Bump these to force a rebuild of the cached kernel / initramfs after changes
# to how they are made.
readonly KERNEL_FORMAT=2 INITRAMFS_FORMAT=1
# Kernel modules the initramfs loads, in this order (dependencies first).
readonly MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev
    virtio_pci netfs fscache 9pnet 9pnet_virtio 9p overlay)

# Temporary directories to remove on exit, and qemu's `timeout` wrapper.
CLEAN=()
TMP=
QPID=
cleanup() {
    if [[ -n $QPID ]]; then kill -KILL "$QPID" 2>/dev/null || true; fi
    if ((${#CLEAN[@]})); then rm -rf "${CLEAN[@]}"; fi
}
trap cleanup EXIT

say() { printf 'run-vm.sh: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit "$VM_FAIL"
}

usage() {
    cat >&2 <<'EOF'
usage: tests/vm/run-vm.sh [--timeout SECONDS] [--mem SIZE] -- CMD [ARGS...]
       tests/vm/run-vm.sh --prepare

Runs CMD inside a qemu VM with a pure cgroup v2 hierarchy; exits with CMD's
status, or 125 if the VM itself failed.  --prepare only builds the cached
kernel and initramfs.  Defaults: --timeout 600 --mem 2G.
EOF
    exit "${1:-$VM_FAIL}"
}

# ---------------------------------------------------------------------------
# Host packages

# apt-get, retried while another apt/dpkg run holds its locks.
apt_get() {
    local err i
    err=$(mktemp)
    for ((i = 0; i < 120; i++)); do
        if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=10 \
            "$@" >&2 2>"$err"; then
            rm -f "$err"
            return 0
        fi
        if ! grep -qiE 'could not get lock|unable to acquire|lock.*held|is another process using it' "$err"; then
            cat "$err" >&2
            rm -f "$err"
            return 1
        fi
        sleep 5
    done
    cat "$err" >&2
    rm -f "$err"
    return 1
}

apt_install() {
    say "installing $* with apt-get"
    local opts=(install -y -q --no-install-recommends)
    # A failure may just mean stale (or no) package lists: update and retry.
    apt_get "${opts[@]}" "$@" ||
        { apt_get update -q && apt_get "${opts[@]}" "$@"; } ||
        die "cannot install $*"
}

ensure_host_tools() {
    local pkgs=()
    command -v qemu-system-x86_64 >/dev/null || pkgs+=(qemu-system-x86)
    command -v cpio >/dev/null || pkgs+=(cpio)
    # The initramfs needs a static busybox (the plain `busybox` package's is
    # dynamically linked).
    [[ $(dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null) == installed ]] ||
        pkgs+=(busybox-static)
    if ((${#pkgs[@]})); then apt_install "${pkgs[@]}"; fi
}

# ---------------------------------------------------------------------------
# Cached kernel: $CACHE/kernel/{vmlinuz,vmlinux,modules/*.ko,modules.order,
# version,format}

# The versioned kernel package linux-image-amd64 depends on, e.g.
# linux-image-6.1.0-56-amd64 (preferring it over an -unsigned variant).
resolve_kernel_pkg() {
    local deps pkg
    deps=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 ~ /Depends:$/ { print $2 }') || true
    if [[ -z $deps ]]; then
        apt_get update -q || true
        deps=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '$1 ~ /Depends:$/ { print $2 }') || true
    fi
    pkg=$(grep -E '^linux-image-[0-9][^ ]*-amd64$' <<<"$deps" | head -n1) ||
        pkg=$(grep -E '^linux-image-[0-9][^ ]*-amd64-unsigned$' <<<"$deps" | head -n1) ||
        die "cannot resolve the kernel package behind linux-image-amd64"
    echo "$pkg"
}

# Write module file $1 uncompressed to $2 (busybox insmod cannot be relied on
# to handle compressed modules).
decompress_module() {
    case $1 in
    *.ko) cp "$1" "$2" ;;
    *.ko.xz)
        command -v xz >/dev/null || apt_install xz-utils
        xz -dc "$1" >"$2"
        ;;
    *.ko.zst)
        command -v zstd >/dev/null || apt_install zstd
        zstd -dcq "$1" >"$2"
        ;;
    *.ko.gz) gzip -dc "$1" >"$2" ;;
    *) die "unknown module format: $1" ;;
    esac
}

# Extract the uncompressed kernel (ELF vmlinux) from bzImage $1 into $2, like
# the kernel's scripts/extract-vmlinux: find the compressed payload by its
# magic and decompress it (ignoring the decompressor's complaints about the
# trailing data).  Returns non-zero if that did not produce an ELF file.
extract_vmlinux() {
    local magic cmd off
    for magic in '\xfd7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -dcq' '\x1f\x8b\x08:gzip -dc'; do
        cmd=${magic#*:}
        command -v "${cmd%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -obUaP "${magic%%:*}" "$1" | head -n3 | cut -d: -f1); do
            # shellcheck disable=SC2086  # $cmd is a command and its options
            tail -c "+$((off + 1))" "$1" | $cmd >"$2" 2>/dev/null || true
            [[ $(head -c4 "$2") == $'\x7fELF' ]] && return 0
        done
    done
    rm -f "$2"
    return 1
}

prepare_kernel() {
    local kdir=$CACHE/kernel
    [[ -f $kdir/version && $(cat "$kdir/format" 2>/dev/null) == "$KERNEL_FORMAT" ]] &&
        return 0

    local pkg tmp x vmlinuz moddir new m f
    pkg=$(resolve_kernel_pkg)
    say "downloading kernel $pkg"
    tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
    CLEAN+=("$tmp")
    # (-o APT::Sandbox::User=root: the _apt user cannot write into the cache.)
    # Stale package lists name a version the mirror dropped: update once and retry.
    (cd "$tmp" && apt_get download -q -o APT::Sandbox::User=root "$pkg") ||
        { apt_get update -q && pkg=$(resolve_kernel_pkg) &&
            (cd "$tmp" && apt_get download -q -o APT::Sandbox::User=root "$pkg"); } ||
        die "cannot download $pkg"
    x=$tmp/extract
    dpkg-deb -x "$tmp"/*.deb "$x" || die "cannot extract $pkg"

    vmlinuz=$(find "$x/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
    [[ -n $vmlinuz ]] || die "no vmlinuz in $pkg"
    moddir=$(find "$x/lib/modules" "$x/usr/lib/modules" -mindepth 1 -maxdepth 1 \
        -type d 2>/dev/null | head -n1) || true
    [[ -n $moddir ]] || die "no modules in $pkg"

    new=$tmp/kernel
    mkdir -p "$new/modules"
    cp "$vmlinuz" "$new/vmlinuz"
    # Under TCG, decompressing the kernel takes ~4 s of every boot.  A kernel
    # with PVH support can instead be booted straight from its ELF image.
    if grep -qx CONFIG_PVH=y "$x"/boot/config-* 2>/dev/null; then
        extract_vmlinux "$vmlinuz" "$new/vmlinux" ||
            say "note: cannot extract vmlinux, booting the compressed kernel"
    fi
    : >"$new/modules.order"
    for m in "${MODULES[@]}"; do
        f=$(find "$moddir/kernel" \( -name "$m.ko" -o -name "$m.ko.*" \) -print -quit)
        if [[ -z $f ]]; then
            # Built into this kernel (or gone, e.g. merged into another
            # module): nothing to load.
            grep -q "/$m\.ko\$" "$moddir/modules.builtin" ||
                say "note: module $m does not exist in $pkg, skipping it"
            continue
        fi
        decompress_module "$f" "$new/modules/$m.ko"
        echo "$m" >>"$new/modules.order"
    done
    echo "$pkg $(dpkg-deb -f "$tmp"/*.deb Version)" >"$new/version"
    echo "$KERNEL_FORMAT" >"$new/format"

    rm -rf "$kdir"
    mv "$new" "$kdir"
    rm -rf "$tmp"
}

# ---------------------------------------------------------------------------
# Cached base initramfs: $CACHE/initramfs.cpio (+ .stamp: hash of its inputs)

prepare_initramfs() {
    local busybox=/bin/busybox stamp want tmp root a
    want=$(cat <(echo "format $INITRAMFS_FORMAT") "$CACHE/kernel/version" \
        "$CACHE/kernel/modules.order" "$SELF_DIR/init.sh" "$SELF_DIR/stage2.sh" \
        "$busybox" | sha256sum | cut -d' ' -f1)
    stamp=$CACHE/initramfs.stamp
    if [[ -f $CACHE/initramfs.cpio && -f $stamp && $(<"$stamp") == "$want" ]]; then
        return 0
    fi

    tmp=$(mktemp -d "$CACHE/tmp.XXXXXX")
    CLEAN+=("$tmp")
    root=$tmp/root
    mkdir -p "$root/bin" "$root/modules"
    cp "$busybox" "$root/bin/busybox"
    for a in $("$busybox" --list); do
        [[ $a == busybox ]] || ln -s busybox "$root/bin/$a"
    done
    install -m 0755 "$SELF_DIR/init.sh" "$root/init"
    install -m 0755 "$SELF_DIR/stage2.sh" "$root/stage2.sh"
    cp "$CACHE/kernel/modules.order" "$root/modules.order"
    cp "$CACHE"/kernel/modules/*.ko "$root/modules/"
    # Uncompressed: unpacking is faster than decompressing under TCG.
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --quiet) >"$tmp/initramfs.cpio" ||
        die "cannot build the initramfs"

    mv "$tmp/initramfs.cpio" "$CACHE/initramfs.cpio"
    echo "$want" >"$stamp"
    rm -rf "$tmp"
}

prepare() {
    ensure_host_tools
    mkdir -p "$CACHE"
    # Concurrent runs share the cache: build it under a lock.
    local lockfd
    exec {lockfd}>"$CACHE/.lock"
    flock -w 1800 "$lockfd" || die "cannot lock $CACHE/.lock"
    prepare_kernel
    prepare_initramfs
    exec {lockfd}>&-
}

# ---------------------------------------------------------------------------
# The job: what the VM runs (environment, cwd, command)

# Single-quote $1 for sh.
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# The host's PATH, with the real interpreter's directory inserted before a
# pyenv shims directory (the shims work in the VM too, but each call runs
# bash+pyenv, which is slow under TCG).
vm_path() {
    local py real dir out=() d
    py=$(command -v python3 2>/dev/null) || true
    if [[ $py == */shims/python3 ]] && command -v pyenv >/dev/null &&
        real=$(pyenv which python3 2>/dev/null); then
        dir=$(dirname "$real")
        local IFS=:
        for d in $PATH; do
            [[ $d == "$(dirname "$py")" ]] && out+=("$dir")
            out+=("$d")
        done
        echo "${out[*]}"
    else
        echo "$PATH"
    fi
}

# Is the environment variable $1 passed into the VM?
passed_var() {
    case $1 in
    HOME | USER | LOGNAME | LANG | LANGUAGE | LC_* | TZ | TERM | NO_COLOR | FORCE_COLOR | CI) return 0 ;;
    PYTHON* | PYENV* | PY_COLORS | PYTEST_* | VIRTUAL_ENV | CONDA_PREFIX) return 0 ;;
    CARGO_* | RUSTUP_* | RUST_* | NSFAST_*) return 0 ;;
    esac
    return 1
}

# Write the job script ($1) that the VM runs with `env -i /bin/sh`.
write_job() {
    local var arg
    {
        echo "# generated by run-vm.sh"
        echo "export PATH=$(shq "$(vm_path)")"
        while read -r var; do
            passed_var "$var" && echo "export $var=$(shq "${!var}")"
        done < <(compgen -e)
        echo "cd -- $(shq "$PWD") || exit $VM_FAIL"
        printf 'exec'
        for arg in "${CMD[@]}"; do printf ' %s' "$(shq "$arg")"; done
        echo
    } >"$1"
}

# ---------------------------------------------------------------------------
# Running the VM

# Print the tail of the VM's console (boot messages, init errors) to stderr.
show_console() {
    if [[ ! -s $TMP/console.log ]]; then
        say "the VM console is empty (set NSFAST_VM_DEBUG=1 for kernel messages)"
        return 0
    fi
    say "last lines of the VM console:"
    tr -d '\r' <"$TMP/console.log" | tail -n "${1:-25}" | sed 's/^/  | /' >&2
}

run_vm() {
    local timeout=$1 mem=$2 debug=${NSFAST_VM_DEBUG:-0} kernel append st marker catpid sig=
    # Per-run files live in $CACHE/runs/<our pid>.XXXXXX; remove those left
    # behind by runs that were SIGKILLed.
    local d
    mkdir -p "$CACHE/runs"
    for d in "$CACHE"/runs/*; do
        [[ -d $d ]] || continue
        d=${d##*/}
        kill -0 "${d%%.*}" 2>/dev/null || rm -rf "${CACHE:?}/runs/$d"
    done
    TMP=$(mktemp -d "$CACHE/runs/$$.XXXXXX")
    CLEAN+=("$TMP")

    # Per-run initramfs = cached base + a small cpio with the job (cpio
    # archives can simply be concatenated).
    mkdir -p "$TMP/job/job"
    write_job "$TMP/job/job/run"
    printf '%s\n' "$PWD" >"$TMP/job/job/cwd"
    (cd "$TMP/job" && printf '%s\n' job job/run job/cwd |
        cpio -o -H newc -R 0:0 --quiet) >"$TMP/job.cpio"
    cat "$CACHE/initramfs.cpio" "$TMP/job.cpio" >"$TMP/initrd"

    # The uncompressed kernel (PVH boot) if we have it, else the bzImage.
    kernel=$CACHE/kernel/vmlinux
    [[ -f $kernel ]] || kernel=$CACHE/kernel/vmlinuz

    # panic=-1 + -no-reboot: a kernel panic ends qemu at once.  loglevel=1,
    # not 0, since 0 also silences panic messages.
    append="console=ttyS0 panic=-1 mitigations=off"
    if [[ $debug == 1 ]]; then append+=" loglevel=7"; else append+=" quiet loglevel=1"; fi

    # ttyS0: kernel console + exit marker -> console.log
    # ttyS1: the command's output -> qemu's stdout -> a fifo -> cat -> our
    # stdout.  The fifo is there because qemu makes its stdout non-blocking,
    # which would leak (O_NONBLOCK is shared) to whoever gave us our stdout.
    # No stdin: qemu must not touch the terminal.
    mkfifo "$TMP/out"
    cat "$TMP/out" &
    catpid=$!
    # If we are SIGKILLed, the death signals take `timeout` and qemu down too.
    local reap=()
    if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
        reap=(setpriv --pdeathsig KILL)
    fi
    "${reap[@]}" timeout -k 10 "$timeout" "${reap[@]}" qemu-system-x86_64 \
        -accel tcg -machine pc -cpu max -smp 2 -m "$mem" \
        -nodefaults -no-reboot -display none -monitor none \
        -kernel "$kernel" -initrd "$TMP/initrd" -append "$append" \
        -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
        -serial "file:$TMP/console.log" \
        -chardev stdio,id=out,signal=off -serial chardev:out \
        </dev/null >"$TMP/out" &
    QPID=$!

    # Forward SIGINT/SIGTERM/SIGHUP to `timeout` (which passes them on to
    # qemu), then wait for it to be gone.
    trap 'sig=INT; kill -INT "$QPID" 2>/dev/null' INT
    trap 'sig=TERM; kill -TERM "$QPID" 2>/dev/null' TERM
    trap 'sig=HUP; kill -HUP "$QPID" 2>/dev/null' HUP
    while :; do
        st=0
        wait "$QPID" || st=$?
        kill -0 "$QPID" 2>/dev/null || break
    done
    QPID=
    trap - INT TERM HUP
    wait "$catpid" || true

    if [[ $debug == 1 ]]; then show_console 100000; fi
    if [[ -n $sig ]]; then
        say "interrupted (SIG$sig)"
        exit $((128 + $(kill -l "$sig")))
    fi
    if ((st == 124)); then
        show_console
        die "the VM timed out after ${timeout}s"
    fi
    marker=$(tr -d '\r' <"$TMP/console.log" 2>/dev/null |
        grep -ao 'NSFAST_VM_EXIT=[0-9]*' | tail -n1) || true
    if [[ -z $marker ]]; then
        show_console
        die "the VM failed (qemu exit status $st, no exit marker)"
    fi
    exit "${marker#NSFAST_VM_EXIT=}"
}

# ---------------------------------------------------------------------------

main() {
    local timeout=600 mem=2G prepare_only=0
    while (($#)); do
        case $1 in
        --timeout)
            (($# >= 2)) || usage
            timeout=$2
            shift 2
            ;;
        --timeout=*)
            timeout=${1#*=}
            shift
            ;;
        --mem)
            (($# >= 2)) || usage
            mem=$2
            shift 2
            ;;
        --mem=*)
            mem=${1#*=}
            shift
            ;;
        --prepare)
            prepare_only=1
            shift
            ;;
        --)
            shift
            break
            ;;
        -h | --help) usage 0 ;;
        *) usage ;;
        esac
    done
    [[ $timeout =~ ^[1-9][0-9]*$ ]] || die "--timeout wants a positive number of seconds"
    [[ $mem =~ ^[1-9][0-9]*[MGmg]?$ ]] || die "--mem wants a size like 2G or 1536M"

    if ((prepare_only)); then
        (($# == 0)) || usage
        prepare
        exit 0
    fi
    (($#)) || usage
    CMD=("$@")
    prepare
    run_vm "$timeout" "$mem"
}

main "$@"
