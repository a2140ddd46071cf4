#!/usr/bin/env bash
# fetch-ml over a corpus as a Slurm job array: one array task per shard.
#
# Slurm sets SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT; fetch-ml
# reads them (shard = ID - MIN of COUNT), so the array must be contiguous without a step
# (--array=0-7, or 0-7%4 to run 4 at a time). Shard I reads only its own byte range of the
# input and writes OUT_DIR/emb-0000I-of-00008.parquet, which appears only when complete.
# Submitting the array again (after a failure, or with --requeue) skips the shards already
# done.
#
#   sbatch deploy/slurm-array.sh                          # the Docker image fetch-ml:latest
#   RUNTIME=apptainer IMAGE=docker://registry.example.com/fetch-ml:latest sbatch deploy/slurm-array.sh
#   FETCH_ML_BIN=target/release/fetch-ml sbatch deploy/slurm-array.sh   # a binary, no container
#
# Settings (environment, exported to the job by sbatch): IN_DIR (holds INPUT), OUT_DIR,
# MODEL_DIR (holds MODEL), INPUT, MODEL, FORMAT (parquet, npy or jsonl), IMAGE, RUNTIME
# (docker, apptainer or singularity), FETCH_ML_BIN.
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
THREADS=${SLURM_CPUS_PER_TASK:-2}
mkdir -p "$OUT_DIR"

if [ -n "${FETCH_ML_BIN:-}" ]; then
  in=$IN_DIR out=$OUT_DIR models=$MODEL_DIR
  run=("$FETCH_ML_BIN")
else
  in=/data/in out=/data/out models=/models
  case ${RUNTIME:-docker} in
    docker)
      run=(docker run --rm --user "$(id -u):$(id -g)"
           -e SLURM_ARRAY_TASK_ID -e SLURM_ARRAY_TASK_MIN -e SLURM_ARRAY_TASK_COUNT
           -v "$IN_DIR:/data/in:ro" -v "$OUT_DIR:/data/out" -v "$MODEL_DIR:/models:ro"
           "$IMAGE") ;;
    apptainer|singularity)
      # Apptainer passes the environment (the SLURM_* variables) through by default.
      run=("$RUNTIME" run --bind "$IN_DIR:/data/in:ro,$OUT_DIR:/data/out,$MODEL_DIR:/models:ro"
           "$IMAGE") ;;
    *) echo "RUNTIME must be docker, apptainer or singularity, not '$RUNTIME'" >&2; exit 2 ;;
  esac
fi

exec "${run[@]}" --task=1 --threads "$THREADS" \
  --model "$models/$MODEL" --input "$in/$INPUT" \
  --format "$FORMAT" --output "$out/emb-{shard}.$FORMAT"
