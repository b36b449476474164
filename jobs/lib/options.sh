# shellcheck shell=bash
# Helpers on app command lines, sourced by jobs/lib/app-job.sh and jobs/lib/sweep.sh.

# True when the arguments after $1 contain option $1, as "--opt value" or "--opt=value".
has_option() {
  local opt=$1 arg
  shift
  for arg in "$@"; do
    [[ $arg == "$opt" || $arg == "$opt="* ]] && return 0
  done
  return 1
}
