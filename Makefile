# Two commands do all set-up on a fresh machine:
#   make demo   -- install into .venv and replay the origin story (`rebind demo`)
#   make test   -- install into .venv with the dev tools and run ruff, mypy and the whole test suite
#                  (as root with apt-get it also installs, then removes, the system tools tests drive)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# compileall: start-up time matters (`rebind --version` < 80 ms) and PYTHONDONTWRITEBYTECODE may
# be set, in which case an editable install would recompile every module on every run.
install: $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/python -m compileall -q src

install-dev: $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m compileall -q src

demo: install
	$(BIN)/rebind demo

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

# tools/systest.sh: as root with apt-get, installs the system tools some tests drive and removes
# them afterwards; otherwise their tests skip with one summary line (and fail under CI=true).
test: lint
	tools/systest.sh $(BIN)/pytest --require-kernel $(PYTEST_ARGS)

bench: install-dev
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
