#!/usr/bin/env bash
# fetch-ml over a corpus as a Slurm job array: one array task per shard.
#
# The shard count is pinned here (SHARDS, default 8, equal to the --array line below) and each
# task passes its index explicitly: array task id I embeds shard I of SHARDS. So re-submitting
# one index redoes exactly that shard (`sbatch --array=3 deploy/slurm-array.sh` redoes shard 3
# of 8), and an array with a step or gaps runs just the shards it names. Shard I reads only its
# own byte range of the input and writes OUT_DIR/emb-0000I-of-00008.parquet, which appears only
# when complete. Submitting the array again (after a failure, or with --requeue) skips the
# shards that are complete and were made by the same job (input, model, settings).
#
#   sbatch deploy/slurm-array.sh                          # Apptainer if installed, else Docker
#   RUNTIME=apptainer IMAGE=docker://registry.example.com/fetch-ml:latest sbatch deploy/slurm-array.sh
#   FETCH_ML_BIN=target/release/fetch-ml sbatch deploy/slurm-array.sh   # a binary, no container
#   SHARDS=16 sbatch --array=0-15 deploy/slurm-array.sh   # another count: change both together
#
# Containers: Apptainer (or Singularity) runs the image as a child of the Slurm task, inside
# the job's cgroup, so --cpus-per-task and --mem hold. Docker does not: `docker run` asks the
# Docker daemon to start the container, which runs outside Slurm's cgroup and accounting (and
# is not killed by scancel). This script passes Slurm's CPU and memory limits to Docker
# (--cpus, --memory) to stand in for them; prefer Apptainer where it is installed.
#
# Settings (environment, exported to the job by sbatch): IN_DIR (holds INPUT), OUT_DIR,
# MODEL_DIR (holds MODEL), INPUT, MODEL, FORMAT (parquet, npy or jsonl), SHARDS, IMAGE,
# RUNTIME (apptainer, singularity or docker), FETCH_ML_BIN.
#SBATCH --job-name=fetch-ml-embed
#SBATCH --array=0-7
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --output=fetch-ml-embed-%A_%a.log
set -euo pipefail

IN_DIR=${IN_DIR:-$PWD/corpus}
OUT_DIR=${OUT_DIR:-$PWD/embeddings}
MODEL_DIR=${MODEL_DIR:-$PWD/models}
INPUT=${INPUT:-sentences.txt}
MODEL=${MODEL:-all-MiniLM-L6-v2}
FORMAT=${FORMAT:-parquet}
IMAGE=${IMAGE:-fetch-ml:latest}
SHARDS=${SHARDS:-8}
THREADS=${SLURM_CPUS_PER_TASK:-2}

ID=${SLURM_ARRAY_TASK_ID:-}
if ! [[ $ID =~ ^[0-9]+$ ]]; then
  echo "SLURM_ARRAY_TASK_ID='$ID' is not an array task id: submit with sbatch --array=0-$((SHARDS - 1))" >&2
  exit 2
fi
if ! [[ $SHARDS =~ ^[1-9][0-9]*$ ]] || ((10#$ID >= SHARDS)); then
  echo "SLURM_ARRAY_TASK_ID=$ID is not a shard of SHARDS=$SHARDS: array task ids are shard" \
       "indices, so submit --array=0-$((SHARDS - 1)) (or set SHARDS to the full array's size)" >&2
  exit 2
fi
SHARD="$((10#$ID))/$SHARDS"
mkdir -p "$OUT_DIR"

if [ -n "${FETCH_ML_BIN:-}" ]; then
  in=$IN_DIR out=$OUT_DIR models=$MODEL_DIR
  run=("$FETCH_ML_BIN")
else
  in=/data/in out=/data/out models=/models
  runtime=${RUNTIME:-}
  if [ -z "$runtime" ]; then
    if command -v apptainer >/dev/null; then runtime=apptainer
    elif command -v singularity >/dev/null; then runtime=singularity
    else runtime=docker
    fi
  fi
  case $runtime in
    docker)
      echo "note: Docker runs the container outside this job's cgroup; --cpus and --memory" \
           "stand in for Slurm's limits (Apptainer avoids this)" >&2
      limits=(--cpus "$THREADS")
      if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then limits+=(--memory "${SLURM_MEM_PER_NODE}m"); fi
      run=(docker run --rm --user "$(id -u):$(id -g)" "${limits[@]}"
           -v "$IN_DIR:/data/in:ro" -v "$OUT_DIR:/data/out" -v "$MODEL_DIR:/models:ro"
           "$IMAGE") ;;
    apptainer|singularity)
      run=("$runtime" run --bind "$IN_DIR:/data/in:ro,$OUT_DIR:/data/out,$MODEL_DIR:/models:ro"
           "$IMAGE") ;;
    *) echo "RUNTIME must be apptainer, singularity or docker, not '$runtime'" >&2; exit 2 ;;
  esac
fi

exec "${run[@]}" --task=1 --threads "$THREADS" --shard="$SHARD" \
  --model "$models/$MODEL" --input "$in/$INPUT" \
  --format "$FORMAT" --output "$out/emb-{shard}.$FORMAT"
