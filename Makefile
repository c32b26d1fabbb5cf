# Every target installs what it needs into .venv first; `make install` is a no-op when
# pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint openapi tiny-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	@touch $(STAMP)

run: install
	$(PY) -m service.launcher

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service worker tests bench
	$(VENV)/bin/ruff format --check service worker tests bench
	$(VENV)/bin/mypy service worker

openapi: install
	$(PY) -m service.openapi openapi/openapi.json

tiny-model: install
	$(PY) -m worker.tiny_model tiny-model

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data tiny-model
