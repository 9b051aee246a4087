# `make demo` runs the main job, `make test` the default test suite. Both create .venv when missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $(STAMP)

# Real Fashion-MNIST objects for the concept testbed, from Debian's dataset-fashion-mnist package.
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "Fashion-MNIST is missing: install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist) or set SURGERY_FASHION_MNIST"; \
	  fi; \
	fi

demo: $(STAMP) data
	$(BIN)/surgery demo

test: $(STAMP) data
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
