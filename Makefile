# visionzoo: `make demo` sets everything up and trains the Fashion-MNIST demo; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARCH   := $(shell uname -m)
# torch/torchvision pairs that install from this project's machines' local disks; a torchvision
# from the registry that does not match the local torch fails to import.
ifeq ($(ARCH),x86_64)
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
else
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
endif
FMNIST := /usr/share/datasets/fashion-mnist

# PYTEST_ARGS="-n 2": pytest-xdist, 2 test processes (README "Tests"); CI runs them one at a time.
PYTEST_ARGS ?=

.PHONY: setup data demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Fashion-MNIST from Debian's dataset-fashion-mnist, where apt is available and the files are missing.
data:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "no apt-get: put the Fashion-MNIST IDX files in a folder and pass --data"; fi; \
	fi

demo: setup data
	$(BIN)/visionzoo train fashion_mnist

# ruff: style, complexity, argument counts, types (pyproject.toml [tool.ruff]); lint-imports: the
# package's layers (pyproject.toml [tool.importlinter]); an import that points up fails.
test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
