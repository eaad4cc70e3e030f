#!/usr/bin/env bash
# Pin the RK3588's CPU, NPU and DDR clocks at their maximum for comparable benchmarks, and undo it.
#
#   scripts/board_clocks.sh status            # governors and frequencies now (no root needed)
#   sudo scripts/board_clocks.sh pin          # save the current settings, then pin everything at max
#   sudo scripts/board_clocks.sh unpin        # put the saved settings back
#   sudo scripts/board_clocks.sh pin --dry-run   # print the sysfs writes, change nothing
#
# Why: by default the kernel's governors (schedutil, dmc_ondemand, simple_ondemand...) scale the
# clocks with load, so a benchmark measures how fast the clocks ramp up as much as the model, and
# two runs differ. Rockchip's published figures are taken with every clock at its maximum and the
# deeper CPU idle state off (rknn-llm's scripts/fix_freq_rk3588.sh); pinning does the same, so a
# board's numbers can be compared with them and with each other. Pinned clocks draw more power and
# heat: use a heatsink/fan, and unpin afterwards (a reboot also resets everything).
#
# What it writes (sysfs, root only): each CPU cluster's cpufreq governor (policy0 = A55, policy4 and
# policy6 = A76) -> performance; the NPU (devfreq *npu*) and DDR (devfreq dmc) governors -> performance
# (or userspace at the highest available frequency when a node has no performance governor); and
# cpuidle state1 of every CPU -> disabled. Before writing, the current value of every file it will
# touch is saved to the state file (default /run/smolvlm-clocks.state, gone after a reboot), in the
# order unpin writes them back. pin refuses to run twice without unpin in between (--force overrides),
# so the saved settings are always the original ones. If a write fails half way, what was already
# changed is put back. SYSFS=/path runs it against a copy of /sys (for testing).
set -euo pipefail

SYSFS=${SYSFS:-/sys}
STATE=/run/smolvlm-clocks.state
DRY=0
FORCE=0
ACTION=""

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        status|pin|unpin) ACTION=$1; shift ;;
        --dry-run|-n) DRY=1; shift ;;
        --force) FORCE=1; shift ;;
        --state) STATE=${2:?--state needs a file}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "board_clocks.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$ACTION" ] || { usage >&2; exit 2; }

CPUFREQ="$SYSFS/devices/system/cpu/cpufreq"
DEVFREQ="$SYSFS/class/devfreq"

read_file() { cat "$1" 2>/dev/null || echo "-"; }

cpu_policies() { for p in "$CPUFREQ"/policy*; do [ -d "$p" ] && echo "$p"; done; }
devfreq_nodes() {
    for d in "$DEVFREQ"/*; do
        case "$(basename "$d")" in
            *npu*|dmc) [ -d "$d" ] && echo "$d" ;;
        esac
    done
}
idle_states() { for s in "$SYSFS"/devices/system/cpu/cpu[0-9]*/cpuidle/state1/disable; do [ -f "$s" ] && echo "$s"; done; }

highest() { tr ' ' '\n' < "$1" | grep -E '^[0-9]+$' | sort -n | tail -1; }

status() {
    for p in $(cpu_policies); do
        echo "cpu $(basename "$p") (cpus $(read_file "$p/related_cpus")): governor $(read_file "$p/scaling_governor")," \
             "now $(read_file "$p/scaling_cur_freq") kHz, max $(read_file "$p/scaling_max_freq") kHz"
    done
    for d in $(devfreq_nodes); do
        echo "$(basename "$d"): governor $(read_file "$d/governor"), now $(read_file "$d/cur_freq") Hz," \
             "max $(read_file "$d/max_freq") Hz"
    done
    local off=0 total=0
    for s in $(idle_states); do
        total=$((total + 1))
        [ "$(read_file "$s")" = 1 ] && off=$((off + 1))
    done
    echo "cpuidle state1 disabled on $off of $total CPUs"
    if [ -f "$STATE" ]; then echo "pinned by this script (saved settings: $STATE)"; else echo "not pinned by this script"; fi
}

# -- pin / unpin ---------------------------------------------------------------------------------

WRITTEN=()  # "path<TAB>old value" of every file changed so far, for the rollback on failure

write() {  # write VALUE PATH
    if [ "$DRY" = 1 ]; then
        echo "[dry-run] echo $1 > $2"
        return 0
    fi
    local old
    old=$(cat "$2")
    if ! { echo "$1" > "$2"; } 2>/dev/null; then
        echo "board_clocks.sh: could not write '$1' to $2" >&2
        return 1
    fi
    WRITTEN+=("$2"$'\t'"$old")
}

rollback() {
    local i
    for ((i = ${#WRITTEN[@]} - 1; i >= 0; i--)); do
        { echo "${WRITTEN[$i]#*$'\t'}" > "${WRITTEN[$i]%%$'\t'*}"; } 2>/dev/null || true
    done
    echo "board_clocks.sh: pin failed; what it had changed is back as it was" >&2
}

save_state() {  # the restore list: governors (then a userspace node's frequency), idle states
    local p d s gov
    for p in $(cpu_policies); do
        gov=$(cat "$p/scaling_governor")
        printf '%s\t%s\n' "$p/scaling_governor" "$gov"
        if [ "$gov" = userspace ] && [ -f "$p/scaling_setspeed" ]; then
            printf '%s\t%s\n' "$p/scaling_setspeed" "$(cat "$p/scaling_setspeed")"
        fi
    done
    for d in $(devfreq_nodes); do
        gov=$(cat "$d/governor")
        printf '%s\t%s\n' "$d/governor" "$gov"
        if [ "$gov" = userspace ] && [ -f "$d/userspace/set_freq" ]; then
            printf '%s\t%s\n' "$d/userspace/set_freq" "$(cat "$d/userspace/set_freq")"
        fi
    done
    for s in $(idle_states); do
        printf '%s\t%s\n' "$s" "$(cat "$s")"
    done
}

pin_node() {  # pin_node GOVERNOR_FILE AVAILABLE_GOVERNORS_FILE FREQUENCIES_FILE SETSPEED_FILE
    if grep -qw performance "$2" 2>/dev/null; then
        write performance "$1"
    elif grep -qw userspace "$2" 2>/dev/null && [ -f "$3" ]; then
        write userspace "$1" && write "$(highest "$3")" "$4"
    else
        echo "board_clocks.sh: $(dirname "$1") offers neither 'performance' nor 'userspace'; left as it is" >&2
    fi
}

pin() {
    if [ -z "$(cpu_policies)$(devfreq_nodes)" ]; then
        echo "board_clocks.sh: no cpufreq policies or NPU/DDR devfreq nodes under $SYSFS: not an RK3588 board?" >&2
        exit 1
    fi
    if [ -f "$STATE" ] && [ "$FORCE" = 0 ]; then
        echo "board_clocks.sh: already pinned ($STATE holds the original settings); unpin first, or --force" >&2
        exit 1
    fi
    if [ "$DRY" = 1 ]; then
        echo "[dry-run] save the current settings to $STATE:"
        save_state | sed 's/^/[dry-run]   /'
    else
        save_state > "$STATE.tmp"
        mv "$STATE.tmp" "$STATE"
    fi
    local p d s
    for p in $(cpu_policies); do
        pin_node "$p/scaling_governor" "$p/scaling_available_governors" "$p/scaling_available_frequencies" \
                 "$p/scaling_setspeed" || { rollback; rm -f "$STATE"; exit 1; }
    done
    for d in $(devfreq_nodes); do
        pin_node "$d/governor" "$d/available_governors" "$d/available_frequencies" "$d/userspace/set_freq" \
            || { rollback; rm -f "$STATE"; exit 1; }
    done
    for s in $(idle_states); do
        write 1 "$s" || { rollback; rm -f "$STATE"; exit 1; }
    done
    [ "$DRY" = 1 ] || status
}

unpin() {
    if [ ! -f "$STATE" ]; then
        echo "board_clocks.sh: nothing to undo ($STATE not found: not pinned by this script, or rebooted since)" >&2
        exit 1
    fi
    local path value failed=0
    while IFS=$'\t' read -r path value; do
        [ -n "$path" ] || continue
        if [ "$DRY" = 1 ]; then
            echo "[dry-run] echo $value > $path"
        elif ! { echo "$value" > "$path"; } 2>/dev/null; then
            echo "board_clocks.sh: could not restore $path to '$value'" >&2
            failed=1
        fi
    done < "$STATE"
    if [ "$DRY" = 0 ]; then
        [ "$failed" = 1 ] || rm -f "$STATE"
        status
    fi
    return "$failed"
}

case "$ACTION" in
    status) status ;;
    pin|unpin)
        if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ] && [ "$SYSFS" = /sys ]; then
            echo "board_clocks.sh: $ACTION writes to /sys: run it with sudo" >&2
            exit 1
        fi
        "$ACTION" ;;
esac
