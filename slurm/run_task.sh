#!/usr/bin/env bash
# slurm/run_task.sh — the ONE srun task per node started by slurm/train*.sbatch. Not meant to be run by hand.
#
#   srun --ntasks-per-node=1 bash slurm/run_task.sh PYTHON -m accelerate.commands.launch ... \
#        --machine_rank {SLURM_NODEID} ... -m train --config RUN.yaml ...
#
# 1. Every argument that is exactly `{SLURM_NODEID}` is replaced by THIS task's $SLURM_NODEID, so the machine
#    rank is expanded per node (expanding it in the batch shell would make every node rank 0, and the
#    rendezvous would hang).
# 2. It starts the launcher (accelerate launch = torchrun's elastic agent) in the background with SIGUSR1
#    IGNORED: SLURM delivers a forwarded USR1 to every process of the step, and the agent, which has no
#    handler for USR1, would die on it and orphan/kill the trainers. The trainers install their own handler.
# 3. It traps USR1 and TERM and forwards them to the launcher's children (the trainer processes, one per
#    GPU/CPU slot): `pkill -<SIG> -P <launcher pid>`. (On this SLURM the trainers usually also get the
#    signal directly; a second copy is harmless: the trainer only sets a flag.)
# 4. It waits for the launcher again after every signal and exits with the launcher's exit code. Note that
#    accelerate/torchrun report ANY failing worker as 1 (workers exiting 75 = "checkpointed, requeue me"
#    become 1), so the batch script decides about requeueing from <output_dir>/run_status.json.
set -u

NODEID=${SLURM_NODEID:-}
if [ -z "$NODEID" ]; then
    echo "run_task.sh: error: SLURM_NODEID is not set (run it through srun inside a job)" >&2
    exit 2
fi
NODE=${SLURMD_NODENAME:-$(hostname -s)}
TAG="bertfit[task node=$NODE nodeid=$NODEID]"

ARGS=()
for a in "$@"; do
    if [ "$a" = "{SLURM_NODEID}" ]; then ARGS+=("$NODEID"); else ARGS+=("$a"); fi
done
if [ ${#ARGS[@]} -eq 0 ]; then
    echo "run_task.sh: error: no command given" >&2
    exit 2
fi

LAUNCHER_PID=""
forward() {  # runs inside a trap: no command substitution here
    echo "$TAG: got SIG$1 -> forwarding SIG$1 to the trainer processes (children of launcher pid ${LAUNCHER_PID:-none})"
    if [ -n "$LAUNCHER_PID" ]; then
        if command -v pkill >/dev/null 2>&1; then
            pkill -"$1" -P "$LAUNCHER_PID" || true
        else
            local c
            for c in /proc/"$LAUNCHER_PID"/task/*/children; do
                read -r -a kids <"$c" 2>/dev/null || continue
                [ ${#kids[@]} -gt 0 ] && kill -s "$1" "${kids[@]}" 2>/dev/null
            done
        fi
    fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

echo "$TAG: machine rank $NODEID of ${SLURM_NNODES:-?} on $NODE" \
    "(host $(hostname -s), restart ${SLURM_RESTART_COUNT:-0})"
echo "$TAG: launching: ${ARGS[*]}"
( trap '' USR1; exec "${ARGS[@]}" ) &
LAUNCHER_PID=$!

# `wait` returns early (>128) whenever a trapped signal arrives; keep waiting until the launcher is gone,
# then collect its real exit status (bash remembers it).
while kill -0 "$LAUNCHER_PID" 2>/dev/null; do
    wait "$LAUNCHER_PID"
done
wait "$LAUNCHER_PID"
RC=$?
if [ "$RC" -eq 0 ]; then
    echo "$TAG: launcher exited with code 0"
else
    echo "$TAG: launcher exited with code $RC (accelerate/torchrun report every failing worker as 1, including a" \
        "trainer that exited 75 = checkpointed, requeue me; the batch script reads run_status.json to tell)"
fi
exit "$RC"
