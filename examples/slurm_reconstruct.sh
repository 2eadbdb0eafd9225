#!/bin/bash
# Reconstruct one subject's test images with a SLURM job array: every array task is one process with one GPU
# and takes every 8th image (images[task::8], by ascending nsdId); seeds are per image, so the result does not
# depend on the number of tasks. Finished images are skipped: submit the same script again after a time limit,
# a preemption or a crash, with as many tasks as you like, and it continues where it stopped.
#
#   sbatch examples/slurm_reconstruct.sh                              # subject 1, stage 2, published mode
#   SUBJECT=2 STAGE=1 sbatch examples/slurm_reconstruct.sh            # other settings through the environment
#   EXTRA="--images 0..100 --iterations 90" sbatch examples/slurm_reconstruct.sh   # any other option
#
# Decoding runs once per subject: the first task to start decodes (into $MDLIB_DATA/nsd/mdlib_cache) while the
# others wait for its lock file. To keep their GPUs from idling meanwhile, decode in a job of its own first:
#
#   jid=$(sbatch --parsable --gres=gpu:1 --time=2:00:00 --wrap "mdlib reconstruct --subject 1 --stage 2 --decode-only")
#   arr=$(sbatch --parsable --dependency=afterok:$jid examples/slurm_reconstruct.sh)
#   sbatch --dependency=afterany:$arr --gres=gpu:1 --wrap "mdlib reconstruct --subject 1 --stage 2 --gather"
#
# $MDLIB_DATA (the data, its cache and the outputs) must be on a file system every node shares (NFS works;
# Lustre needs its flock mount option for the decoding lock).
#SBATCH --job-name=mdlib-reconstruct
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=48G
#SBATCH --time=24:00:00
#SBATCH --output=mdlib-reconstruct-%A_%a.out

set -euo pipefail
export MDLIB_DATA=${MDLIB_DATA:-$HOME/mdlib-data}
export HF_HUB_OFFLINE=1     # compute nodes rarely reach the hub: get the models first (mdlib fetch --models)
SUBJECT=${SUBJECT:-1}
STAGE=${STAGE:-2}
MODE=${MODE:-published}     # stage 2: published or fast
PRESET=${PRESET:-nsd}       # nsd: the real NSD and SD v1-4; mini: mini-NSD and the tiny models
OUT=${OUT:-$MDLIB_DATA/runs/reconstruct/$PRESET}

args=(--subject "$SUBJECT" --stage "$STAGE" --preset "$PRESET" --out "$OUT")
if [ "$STAGE" = 2 ]; then args+=(--mode "$MODE"); fi
# shellcheck disable=SC2206  # EXTRA is split into words on purpose
args+=(${EXTRA:-})

# One GPU per task. For nodes of several GPUs, give each task all of them and one process per GPU instead:
#   #SBATCH --gres=gpu:4
#   torchrun --standalone --nproc_per_node 4 -m mdlib.cli reconstruct "${args[@]}"
# (the task's processes are ranks task x 4 + 0..3 of tasks x 4).
mdlib reconstruct "${args[@]}"
