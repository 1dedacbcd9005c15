# The two commands: `make run` starts the default stack (`lmserve up`: a gateway on :8000 in front of
# two servers of the built-in demo model); `make test` runs every test.
# Both create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch (a plain `torch` pulls a multi-GB CUDA build). Override on a GPU machine.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install venv kernels lint demo-model

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# The Python packages only.
venv: $(STAMP)

# The C++ CPU kernels for this CPU (lmserve/engine/kernels.py): about a minute the first time, a
# second or two once built, so that no server start (and no test) pays for the build.
kernels: $(STAMP)
	$(PY) -m lmserve.engine.kernels build

install: venv kernels

run: install
	$(VENV)/bin/lmserve up

test: install
	scripts/install-test-deps.sh
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check lmserve tests
	$(VENV)/bin/mypy

# Retrain the built-in demo model (lmserve/demo_model/) from Debian packages: ~30 minutes on 2 cores.
demo-model: $(STAMP)
	$(PY) tools/train_demo_model.py
