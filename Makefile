# The two commands of the README's Quick start.
.PHONY: up test gen envoy-config docs deploy-check gpu-check

up:  ## set up and run the mesh on this machine (Ctrl-C stops it)
	scripts/bootstrap.sh
	.venv/bin/infermesh up

test:  ## set up and run every test
	scripts/test.sh

gen:  ## regenerate services/genproto from protos/
	.venv/bin/python scripts/gen_protos.py

envoy-config:  ## re-render envoy/local.json
	.venv/bin/python -m infermesh.envoy render --out envoy/local.json

docs:  ## regenerate docs/settings.md and docs/cli.md from the code
	.venv/bin/python -m infermesh.settings_doc
	.venv/bin/python -m infermesh.cli_doc

deploy-check:  ## build every kustomize overlay and validate it offline (kubectl, kubernetes-validate, envoy, hadolint; the dev extra)
	scripts/validate_deploy.sh

gpu-check:  ## on a host with an NVIDIA GPU: the GPU tests and the scoring benchmark on CUDA, into gpu-check/
	scripts/gpu_check.sh
