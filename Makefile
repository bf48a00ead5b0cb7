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
# (flip TTA is the preset's eval.flip: `make features` and `stegoscope study` extract the same stores)
ARGS    ?=
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-slow lint demo demo-future docs-figures features status clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[test]'

# pytest-xdist workers: 2 took 5.5 min against 8 min for one on the 2-core CI machine
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The tests marked `slow` (kills at every kind of write, S3 end to end, pynndescent's first index
# build): minutes each; CI runs them after `make test`.
test-slow:
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m slow

lint:
	$(BIN)/ruff check

demo:
	$(BIN)/stegoscope demo --cache $(CACHE)

# The paper's open questions on the demo (after `make demo`): clusterers, over-clustering, h-NNE's hierarchy, a loss grid.
demo-future: demo
	$(BIN)/stegoscope study demo --cache $(CACHE) --only future
	$(BIN)/stegoscope figures --cache $(CACHE) --study demo

# The README's figure, from a demo run in a cache of its own (only the demo preset's experiment).
DOCS_CACHE ?= .stegoscope-cache/docs-demo
docs-figures:
	$(BIN)/stegoscope demo --cache $(DOCS_CACHE)
	cp $(DOCS_CACHE)/figures/demo/fig4_miou_vs_dim.png docs/demo_fig4.png
	$(BIN)/python docs/screenshot.py $(DOCS_CACHE)/reports/demo/index.html docs/demo_report.png

# Extract train and val tokens of one dataset preset, e.g. `make features DATASET=potsdam DATA_ROOT=/data`.
features:
	$(BIN)/stegoscope extract --preset $(DATASET) --cache $(CACHE) $(if $(DATA_ROOT),--data-root $(DATA_ROOT),) $(ARGS)

status:
	$(BIN)/stegoscope status --preset $(DATASET) --cache $(CACHE)

clean:
	rm -rf $(CACHE)
