# Every target installs what it needs into .venv first; `make install` is a no-op when
# pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run demo test lint openapi tiny-model bench bench-eval clean

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
	$(VENV)/bin/ruff check core service worker client tests bench scripts
	$(VENV)/bin/ruff format --check core service worker client tests bench scripts
	$(VENV)/bin/mypy core service worker client
	$(VENV)/bin/lint-imports

openapi: install
	$(PY) -m service.openapi openapi/openapi.json

tiny-model: install
	$(PY) -m worker.model.tiny_model tiny-model

# The whole stack on the tiny random-weight model: no network, no GPU, no weights needed.
demo: install
	@test -f tiny-model/tiny_decoder/config.json || $(PY) -m worker.model.tiny_model tiny-model
	@test -f tiny-model/clip_scorer/config.json || \
	  $(PY) -m worker.model.tiny_model tiny-model/clip_scorer --family clip
	@test -f tiny-teacher/config.json || \
	  $(PY) -m worker.model.tiny_model tiny-teacher --family classifier
	@DISTILL_MODEL=./tiny-model DISTILL_TEACHERS=./tiny-teacher \
	  DISTILL_DEVICE=cpu HF_HUB_OFFLINE=1 $(PY) -m service.launcher

# Generation benchmark (reference / engine / bare / service / post-processing); see BENCHMARKS.md.
bench: install
	$(PY) bench/generation.py $(BENCH_ARGS)

# Evaluator calibration on random real CIFAR-10 subsets (long on a CPU; see BENCHMARKS.md).
bench-eval: install
	$(PY) bench/eval_calibration.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data tiny-model tiny-teacher
