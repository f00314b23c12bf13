# Two commands set a fresh machine up: `make run` (backend + embedded Redis + a worker) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Optional: a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu for a CPU-only install.
TORCH_INDEX_URL ?=

.PHONY: install run worker test test-fast lint bench demo clean

$(BIN)/medebiaser: pyproject.toml constraints/project.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_INDEX_URL)" ]; then $(BIN)/pip install -q torch torchvision --index-url $(TORCH_INDEX_URL); fi
	$(BIN)/pip install -q -e '.[dev]' -c constraints/project.txt
	touch $@

install: $(BIN)/medebiaser

run: install
	$(BIN)/medebiaser serve

worker: install
	$(BIN)/medebiaser worker

test: install
	$(BIN)/python -m pytest -q -ra

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow and not e2e"

lint: install
	$(BIN)/ruff check ml_backend tests bench
	$(BIN)/ruff format --check ml_backend tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/run_all.py

# A local Label Studio + this backend with demo images, predictions and a review queue; Ctrl-C stops it all.
# DEMO_IMAGES=<folder of PNG/JPEG X-rays> uses real images instead of synthetic ones; DEMO_ARGS=--fresh starts over.
DEMO_IMAGES ?=
DEMO_ARGS ?=
demo: install
	bash scripts/install_label_studio.sh
	$(BIN)/medebiaser demo $(if $(DEMO_IMAGES),--images "$(DEMO_IMAGES)") $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
