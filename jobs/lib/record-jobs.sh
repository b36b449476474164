#!/usr/bin/env bash
# Slurm's record of how each job of a sweep ended, kept beside its result: jobs/submit submits this
# script as one small job that waits for every job array of the sweep (--dependency=afterany), so it
# runs whatever they ended as, a node failure or a time limit included, when the batch script itself
# could write nothing more. For each point it writes DIR/<label>/slurm_job_end.txt (scontrol show job;
# then sacct's accounting lines where the cluster keeps accounting) and one line of DIR/jobs_end.tsv.
#
# usage: record-jobs.sh DIR     (DIR: a sweep directory of jobs/submit, with its jobs.tsv)
set -uo pipefail  # not -e: one job's missing record must not lose the others

dir=${1:?usage: record-jobs.sh SWEEP_DIR}
[[ -f $dir/jobs.tsv ]] || { echo "record-jobs: error: $dir/jobs.tsv not found" >&2; exit 2; }

accounting=0  # sacct answers only where slurmdbd (or a job completion store) keeps the records
if command -v sacct >/dev/null 2>&1 &&
   ! scontrol show config 2>/dev/null | grep -qE '^AccountingStorageType *= *(accounting_storage/)?none'; then
  accounting=1
fi

# The value of KEY in a one-line scontrol record.
field() { sed -nE "s/.*(^| )$2=([^ ]*).*/\\2/p" <<<"$1"; }

printf 'label\tjob\tstate\texit_code\tnodes\treason\n' >"$dir/jobs_end.tsv"
missing=0
# jobs.tsv: job, script, labels (the array's points in task order).
while IFS=$'\t' read -r job _ labels; do
  read -r -a points <<<"$labels"
  for task in "${!points[@]}"; do
    label=${points[task]} id="${job}_$task"
    mkdir -p "$dir/$label"  # a point whose job never started has no directory yet
    end=$dir/$label/slurm_job_end.txt
    record=$(scontrol -o show job "$id" 2>&1)
    if [[ $record != *JobState=* ]]; then  # purged (MinJobAge) or never known: say so, in the file too
      echo "record-jobs: warning: no record of job $id ($label): $record" >&2
      missing=$((missing + 1))
    fi
    {
      echo "# Slurm's record of job $id (point $label), written by jobs/lib/record-jobs.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
      scontrol show job "$id" 2>&1
      if ((accounting)); then
        echo "# sacct -j $id"
        sacct -j "$id" -P -o JobID,JobName,State,ExitCode,DerivedExitCode,Elapsed,Start,End,NodeList,Reason 2>&1
      fi
    } >"$end"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$id" "$(field "$record" JobState)" "$(field "$record" ExitCode)" \
      "$(field "$record" NodeList)" "$(field "$record" Reason)" >>"$dir/jobs_end.tsv"
  done
done < <(tail -n +2 "$dir/jobs.tsv")
echo "record-jobs: the records of $(($(wc -l <"$dir/jobs_end.tsv") - 1)) point(s) in $dir (jobs_end.tsv)"
((missing == 0)) || exit 1
