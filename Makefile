# faceloop: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0
export DO_NOT_TRACK := 1

.PHONY: venv models demo test test-unit test-integration review-up review-down labelstudio bench lint clean report-shot

# torch first: the pinned CPU build lies on disk; resolving it later could pull a CUDA build.
# '.[pipeline,dev]': the core install is only the training reader (see pyproject.toml).
# insightface with --no-deps: its wheel asks for the GUI opencv-python (5.x), which breaks SFace
# beside the headless build we pin; pyproject lists the deps its model zoo really needs.
$(BIN)/.faceloop-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[pipeline,dev]'
	$(BIN)/pip install -q --no-deps insightface==2.1
	touch $@

venv: $(BIN)/.faceloop-installed

models: venv
	$(BIN)/faceloop models fetch --config configs/demo.yaml

# The demo ends with the review queue in Label Studio: `review up` starts it (own venv,
# 127.0.0.1:8080, generated admin password and token under var/labelstudio/), the refresh pushes.
demo: models labelstudio
	$(BIN)/faceloop review up --config configs/demo.yaml
	$(BIN)/faceloop demo --config configs/demo.yaml

# Label Studio lives in its own venv (.venv-labelstudio): its pins conflict with Prefect's.
labelstudio:
	bash scripts/labelstudio.sh install

review-up: venv labelstudio
	$(BIN)/faceloop review up --config configs/demo.yaml

review-down:
	$(BIN)/faceloop review down --config configs/demo.yaml

# The test suite starts the servers it needs (Prefect, SeaweedFS S3, Label Studio) on 127.0.0.1.
# `make test` runs both tiers; `make test-unit` is the fast one (no servers, about a minute).
test: venv labelstudio
	$(BIN)/pytest -q

test-unit: venv
	$(BIN)/pytest -q -m "not integration"

test-integration: venv labelstudio
	$(BIN)/pytest -q -m integration

bench: models
	$(BIN)/faceloop bench --quick

# ruff (format and rules) and mypy over the packages; the pre-commit hooks run the same.
lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Screenshots of the run report (privacy "blur") of a small synthetic store, taken with headless
# Chromium (Debian: apt-get install -y chromium; or CHROMIUM=/path): PNGs under var/report-shot/.
report-shot: venv
	PYTHONPATH=$(CURDIR) $(BIN)/python scripts/report_shot.py

clean:
	rm -rf var .pytest_cache
