# stegoscope — two commands: `make install`, then `make test` (or `make demo`).
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# CPU machines of this workplace take this pair from local disk; elsewhere pip resolves the ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
CACHE   ?= .stegoscope-cache
DATASET ?= demo
DATA_ROOT ?=
# More `stegoscope extract` options, e.g. ARGS='--weights dino_vitbase8_pretrain.pth --skip-bad'
ARGS    ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install test demo features status clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[test]'

test:
	$(BIN)/python -m pytest -q

demo:
	$(BIN)/stegoscope demo --cache $(CACHE)

# Extract train and val tokens of one dataset preset, e.g. `make features DATASET=potsdam DATA_ROOT=/data`.
features:
	$(BIN)/stegoscope extract --preset $(DATASET) --cache $(CACHE) $(if $(DATA_ROOT),--data-root $(DATA_ROOT),) $(ARGS)

status:
	$(BIN)/stegoscope status --preset $(DATASET) --cache $(CACHE)

clean:
	rm -rf $(CACHE)
