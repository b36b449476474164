# shellcheck shell=bash
# Helpers on app command lines and on the values jobs/ renders into scripts and commands, sourced
# by jobs/lib/app-job.sh and jobs/lib/sweep.sh (the caller defines die()).

# True when the arguments after $1 contain option $1, as "--opt value" or "--opt=value".
has_option() {
  local opt=$1 arg
  shift
  for arg in "$@"; do
    [[ $arg == "$opt" || $arg == "$opt="* ]] && return 0
  done
  return 1
}

# Dies when value $2 of option (or variable) $1 holds a control character: a newline would start a
# line of its own in a rendered script, a carriage return or an escape would hide text.
check_text() {
  [[ $2 != *[[:cntrl:]]* ]] ||
    die "$1: control characters (newline, tab, carriage return, escape, ...) are not allowed in paths and names"
}

# Dies unless $2 (given as $1: --cluster or PB_CLUSTER) is a profile name: [A-Za-z0-9._-]+, not
# starting with '.'. Profiles are looked up by name in jobs/clusters/ only, never by path.
check_profile_name() {
  check_text "$1" "$2"
  [[ $2 =~ ^[A-Za-z0-9_-][A-Za-z0-9._-]*$ ]] ||
    die "$1 '$2' is not a profile name: a name is letters, digits, '.', '_' and '-', not starting with '.', of a profile jobs/clusters/NAME.env (no paths)"
}

# Appends to the caller's array `args` what the profile adds to app $1's command line (the app's
# arguments follow $1; an option given there wins): --peak-tflops PB_PEAK_TFLOPS where set (not 0)
# for the training apps; for parabench-micro, which takes each device's peak from its own table,
# --max-bytes 256M on a profile without GPUs, since its collectives' default (8 B to 1 GiB) is sized
# for GPU memory and on a CPU node every rank's buffers share the node's memory.
add_profile_options() {
  local app=$1
  shift
  if [[ $app == micro ]]; then
    if [[ ${PB_GPUS_PER_NODE:-0} == 0 ]] && ! has_option --max-bytes "$@"; then
      args+=(--max-bytes 256M)
    fi
  elif ! has_option --peak-tflops "$@" && [[ -n ${PB_PEAK_TFLOPS:-} && $PB_PEAK_TFLOPS != 0 ]]; then
    args+=(--peak-tflops "$PB_PEAK_TFLOPS")
  fi
}
