# Sourced by every batch script hpcml renders and by sbatch/train.sbatch: how the batch shell runs the job
# step (srun ... or mpirun ...) so that a stop reaching the shell is survived and a start-up crash retried.
#
# Why it is needed:
# - Bash runs a trap only after its foreground child exits, and a batch shell without a trap dies at once
#   of a TERM (`scancel --signal=TERM --full` or `--batch`, a time limit): the job then ends and Slurm
#   kills the step while its ranks are still saving. So the step runs in the background and is waited for.
# - srun answers a TERM of its own by SIGKILLing every task ("forcing job termination"). A signal for the
#   batch shell goes to its process group, so the step starts in a session of its own (setsid), where only
#   Slurm's real job termination reaches srun. The ranks hear of a stop from what this shell forwards.
#
# hpcml_run_step CMD...   runs CMD; returns its exit status. Settings, from the environment:
#   HPCML_STOP_SIGNAL          what a TERM or stop signal to this shell is forwarded to the step as (USR2):
#                              srun and mpirun pass it on to every rank, which stop at a step boundary
#                              and save; rank 0 requeues the job.
#   HPCML_STEP_RECORDS         a directory every node sees, for the ranks' marks (hpcml/compute/step_record.py)
#   HPCML_STARTUP_RETRIES_MAX  relaunches of a step that died before its ranks formed their world with no
#                              error from the job's own config or code (an MPI start-up crash) (2)
#   HPCML_MAX_REQUEUES         if a stop came while the ranks were still starting and they died of it,
#                              this shell requeues the job itself, up to this many restarts (0: never)
#   HPCML_MAX_MIGRATIONS       a step that lost ranks to a signal or a failed node after its world formed,
#                              with no error from the job's own code, is a lost peer: the job is requeued
#                              without that node (ExcNodeList), up to this many times (0: never)
#   HPCML_MIN_NODES            the fewest nodes the job can run on (cluster.min_nodes, else cluster.nodes;
#                              sbatch/train.sbatch: this attempt's count unless set): a migration that would
#                              leave the partition fewer healthy nodes fails instead
#   HPCML_ACCOUNTING_WAIT_S    whole seconds to wait for accounting to record why a COMPLETING job ended (20)

hpcml_run_step() {
  local stop=${HPCML_STOP_SIGNAL:-USR2} max_retries=${HPCML_STARTUP_RETRIES_MAX:-2}
  local records=${HPCML_STEP_RECORDS:-.} try=0 rc=0 record lost copier fifo
  HPCML_STEP_PID=
  HPCML_STOP_REQUESTED=0
  mkdir -p "$records"
  # shellcheck disable=SC2064  # $stop is meant to expand now
  # Not passed on once the ranks have finished: a launcher shutting down (mpirun, srun) may no longer catch it,
  # and would die of it, failing a finished job.
  trap "HPCML_STOP_REQUESTED=1; [ -n \"\$HPCML_STEP_PID\" ] && [ ! -e \"\${record:-}/finished\" ] && kill -$stop \"\$HPCML_STEP_PID\" 2>/dev/null || true" TERM "$stop"
  while :; do
    record="$records/step-${SLURM_JOB_ID:-none}.${SLURM_RESTART_COUNT:-0}.$try"
    rm -rf "$record" "$record.launcher"
    copier=
    if [ "$1" = srun ]; then
      # srun's own messages ("n2: tasks 2-3: Killed") say which node lost ranks; they are kept to read after
      # the step and shown then (the ranks' output goes to their own files, not through here).
      HPCML_STEP_RECORD="$record" HPCML_STARTUP_RETRIES="$try" setsid "$@" 2>"$record.launcher" &
    elif [ "$1" = mpirun ]; then
      # mpirun's own messages ("mpirun noticed that process rank 2 ... on node n2 exited on signal 9") say
      # which node lost ranks, on the stderr that also carries the ranks' own, which the job log must show as
      # it is written: a copy goes to the record (removed with it when the step ends). The copier ignores the
      # stop signals: a TERM to this shell's process group must not cut the ranks' stderr off (mpirun would
      # die of the broken pipe).
      fifo=$(mktemp -d "${TMPDIR:-/tmp}/hpcml-stderr.XXXXXX")/stderr
      mkfifo "$fifo"
      (trap '' TERM "$stop" && exec tee "$record.launcher" <"$fifo" >&2) &
      copier=$!
      HPCML_STEP_RECORD="$record" HPCML_STARTUP_RETRIES="$try" setsid "$@" 2>"$fifo" &
    else
      HPCML_STEP_RECORD="$record" HPCML_STARTUP_RETRIES="$try" setsid "$@" &
    fi
    HPCML_STEP_PID=$!
    while kill -0 "$HPCML_STEP_PID" 2>/dev/null; do
      wait "$HPCML_STEP_PID" || true  # returns early whenever a trap ran
    done
    wait "$HPCML_STEP_PID" && rc=0 || rc=$?
    HPCML_STEP_PID=
    if [ -n "$copier" ]; then
      # The copy is whole before it is read: the copier sees the end once every holder of mpirun's stderr has
      # left (its daemons' launcher too); one that lingers is not waited for past a minute.
      for _ in $(seq 600); do kill -0 "$copier" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$copier" 2>/dev/null || true
      wait "$copier" 2>/dev/null || true
      rm -rf "$(dirname "$fifo")"
    elif [ -s "$record.launcher" ]; then
      cat "$record.launcher" >&2
    fi
    if [ "$rc" != 0 ] && [ -e "$record/finished" ]; then
      echo "hpcml: the step ended with exit $rc after its ranks had finished the run (a signal or a cancel as it exited); the job is done" >&2
      rc=0
      break
    fi
    if [ "$rc" != 0 ] && [ -e "$record/formed" ] && [ "$HPCML_STOP_REQUESTED" = 0 ] \
      && ! compgen -G "$record/user_error.*" >/dev/null; then
      lost=$(hpcml_lost_nodes "$record.launcher")
      [ -n "$lost" ] && hpcml_migrate "$records" "$lost" && rc=3
      break
    fi
    if [ "$rc" = 0 ] || [ -e "$record/formed" ] || compgen -G "$record/user_error.*" >/dev/null; then
      break  # it ran, or the job's own config or code failed: nothing to retry
    fi
    if [ "$HPCML_STOP_REQUESTED" = 1 ]; then
      hpcml_requeue_after_early_stop && rc=3
      break
    fi
    if [ "$try" -ge "$max_retries" ]; then
      echo "hpcml: the step died at start-up (exit $rc) $((try + 1)) times before its ranks formed their world; giving up" >&2
      break
    fi
    try=$((try + 1))
    echo "hpcml: the step died at start-up (exit $rc) before its ranks formed their world, with no error from the job's config or code; relaunching it (start-up retry $try of $max_retries)" >&2
  done
  rm -rf "$records/step-${SLURM_JOB_ID:-none}.${SLURM_RESTART_COUNT:-0}".*
  trap - TERM "$stop"
  return "$rc"
}

# This job's state. While a cancelled, timed-out or requeued job's processes are ending, scontrol says only
# COMPLETING; accounting has the real state once slurmdbd recorded it, which took over 15 s on a loaded machine
# (hpcml.slurm_commands.job_state, the same wait for rank 0): wait up to HPCML_ACCOUNTING_WAIT_S (20) seconds
# for the record of this attempt, the one that started at scontrol's StartTime. A job requeued while its
# processes end shows the next attempt's start and EndTime=Unknown: REQUEUED.
hpcml_job_state() {
  local show state started out recorded deadline=$((SECONDS + ${HPCML_ACCOUNTING_WAIT_S:-20}))
  show=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null || true)
  state=$(grep -o 'JobState=[A-Z_]*' <<<"$show" | cut -d= -f2 || true)
  [ "$state" = COMPLETING ] || { echo "$state"; return 0; }
  grep -q 'EndTime=Unknown' <<<"$show" && { echo REQUEUED; return 0; }
  started=$(grep -o 'StartTime=[^ ]*' <<<"$show" | cut -d= -f2 || true)
  while :; do
    # No sacct, or one that fails (a site without accounting): there is nothing to wait for.
    out=$(timeout 10 sacct -X -D -n -P -j "$SLURM_JOB_ID" -o Start,State 2>/dev/null) || break
    recorded=$(awk -F'|' -v start="$started" '$1 == start { split($2, word, " "); state = word[1] } END { print state }' <<<"$out")
    case "$recorded" in
      "" | RUNNING) [ "$SECONDS" -lt "$deadline" ] || break; sleep 0.5 ;;
      *) echo "$recorded"; return 0 ;;
    esac
  done
  echo "hpcml: job $SLURM_JOB_ID is ending, but accounting did not say why (waited up to ${HPCML_ACCOUNTING_WAIT_S:-20} s)" >&2
  echo COMPLETING
}

# A stop reached ranks that had not yet installed their handlers, and they died of it: nothing was trained
# in this attempt, so requeue the job as rank 0 would have, unless Slurm is cancelling it.
hpcml_requeue_after_early_stop() {
  local state
  state=$(hpcml_job_state)
  if [ "$state" = CANCELLED ] || [ "${SLURM_RESTART_COUNT:-0}" -ge "${HPCML_MAX_REQUEUES:-0}" ]; then
    echo "hpcml: stopped while starting; not requeued ($state, restart ${SLURM_RESTART_COUNT:-0} of ${HPCML_MAX_REQUEUES:-0})" >&2
    return 1
  fi
  if [ "$state" = REQUEUED ] || [ "$state" = PENDING ]; then  # `scontrol requeue` would be refused
    echo "hpcml: stopped while starting; Slurm is requeueing job $SLURM_JOB_ID already" >&2
    return 0
  fi
  echo "hpcml: stopped while starting; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
}

# The nodes the launcher reports ranks killed (SIGKILL: an OOM kill, a crash) on, or failed outright, that are
# nodes of this job, comma-separated. srun: only what it reports before it ends the step itself ("Terminating
# StepId"), after which the other ranks are ended too, by a signal of srun's own. mpirun (prterun in Open MPI 5)
# reports the first rank to die (it then ends the others), or the node whose daemon it lost. A rank that died
# of another signal (SIGSEGV, SIGABRT) failed on its own: that is no lost node.
hpcml_lost_nodes() {
  [ -f "$1" ] || return 0
  sed -n -E -e '/Terminating StepId/q' \
    -e 's/^srun: error: ([^: ]+): tasks? [0-9,-]+: Killed$/\1/p' \
    -e 's/^srun: error: Node failure on ([^ ]+).*/\1/p' \
    -e 's/^[a-z]+ noticed that process rank [0-9]+ with PID [0-9]+ on node ([^ ]+) exited on signal 9\b.*/\1/p' \
    -e 's/^ *Remote daemon: .* on node ([^ ]+)$/\1/p' "$1" | sort -u \
    | { grep -xF -f <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null) || true; } | paste -sd, -
}

# Requeue this job without the nodes in $2 (and those excluded before), counting it in $1/migrations-<job>;
# fails, saying why, at the cap or when too few healthy nodes would be left.
hpcml_migrate() {
  local records=$1 lost=$2 ledger="$1/migrations-${SLURM_JOB_ID}" migrated max=${HPCML_MAX_MIGRATIONS:-0}
  local excluded healthy shrink=()
  migrated=$(cat "$ledger" 2>/dev/null | wc -l)
  if [ "$migrated" -ge "$max" ]; then
    echo "hpcml: lost the ranks on $lost; not requeued: the migration cap is reached ($migrated of $max, cluster.max_migrations or HPCML_MAX_MIGRATIONS)" >&2
    return 1
  fi
  excluded=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
  [ "$excluded" = "(null)" ] && excluded=
  # Node lists may be hostlists (n[1,3]): expanded to one name per line before they are merged or counted.
  excluded=$( { [ -n "$excluded" ] && scontrol show hostnames "$excluded"; tr ',' '\n' <<<"$lost"; } | sort -u | paste -sd, -)
  # Nodes that could run the job: neither down nor drained. (Not only those responding right now: a busy node's
  # slurmd can miss the controller's pings while a step is killed, and answers again seconds later.)
  healthy=$(sinfo -h -N -t idle,mixed,allocated,completing -p "${SLURM_JOB_PARTITION}" -o '%N' | sort -u \
    | grep -cvxF -f <(tr ',' '\n' <<<"$excluded") || true)
  if [ "$healthy" -lt "${HPCML_MIN_NODES:-1}" ]; then
    echo "hpcml: lost the ranks on $lost; not requeued: only $healthy nodes of partition ${SLURM_JOB_PARTITION} would be left and the job needs ${HPCML_MIN_NODES:-1} (lower cluster.min_nodes, or HPCML_MIN_NODES for sbatch/train.sbatch, to let it shrink)" >&2
    return 1
  fi
  # A batch script that fixed its tasks per node (sbatch/train.sbatch: mpirun takes its slots from them) has its
  # task count fixed by Slurm at the first start, for that many nodes: requeued without one, it would never fit
  # on fewer (measured: pending for ever, "BadConstraints"). It gets as many tasks as the nodes left can run.
  if [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "$healthy" -lt "${SLURM_JOB_NUM_NODES:-0}" ]; then
    shrink=("NumTasks=$((SLURM_NTASKS_PER_NODE * healthy))")
  fi
  echo "$lost" >>"$ledger"
  echo "hpcml: lost the ranks on $lost (killed, or the node failed) after training began, with no error from the job's code; requeueing job $SLURM_JOB_ID without $excluded (migration $((migrated + 1)) of $max)" >&2
  # A running job's ExcNodeList cannot change: it is set once the requeue has made the job pending. The requeue
  # TERMs every process of the job, this shell and its scontrol included (measured: the update was lost):
  # they ignore it (children inherit that), and Slurm's KILL comes only KillWait seconds later.
  trap '' TERM "${HPCML_STOP_SIGNAL:-USR2}"
  scontrol requeue "$SLURM_JOB_ID" || return 1
  # ${a[@]+...}: an empty array is "unbound" to `set -u` in bash before 4.4.
  scontrol update jobid="$SLURM_JOB_ID" ExcNodeList="$excluded" ${shrink[@]+"${shrink[@]}"} \
    || echo "hpcml: job $SLURM_JOB_ID is requeued, but excluding $excluded ${shrink[@]+"${shrink[*]}"} failed: it may come back on that node, or not fit" >&2
}
