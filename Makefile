# Two commands: `make demo` (the main job on synthetic data) and `make test` (the test suite).
# Each builds the virtual environment on first use and reuses it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
# timm needs a torchvision built for the same torch: the pair that installs from this machine's disk.
TORCH_ZOO := torch==2.14.1 torchvision==0.29.1
NPROC ?= 2

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data/synthetic_demo.h5: | $(VENV)/.installed
	$(PY) -m galaxydist.synthetic $@ --n 4000 --size 64 --seed 0

data/demo.h5: data/synthetic_demo.h5
	$(PY) -m galaxydist.prepare $< $@ --crop 48 --force

demo: data/demo.h5
	rm -rf runs/demo  # a fresh run each time (an existing run folder would be resumed)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m galaxydist.train --config configs/demo.yaml

# The tests need the model zoo (timm, e2cnn) too: the matching torch + torchvision pair first.
$(VENV)/.zoo: $(VENV)/.installed
	$(PY) -m pip install -q $(TORCH_ZOO)
	$(PY) -m pip install -q -e '.[dev,zoo]'
	touch $@

test: $(VENV)/.zoo
	$(PY) -m pytest -q -ra

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf data/synthetic_demo.h5 data/demo.h5 runs/demo
