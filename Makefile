# One entry point for set-up and tests; `.ci/run` calls `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned and installed first so pip never resolves an unpinned torch (which pulls
# several GB of CUDA wheels). Elsewhere, pick your build, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: install test test-slow coverage demo demo-cascade clean

$(BIN)/python:
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test]'
	# make-a-video-pytorch is the reference for parity tests and benchmarks; its declared
	# dependencies pull torchvision and a CUDA torch, so it goes in without them.
	$(BIN)/python -m pip install -q --no-deps make-a-video-pytorch==0.4.0
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -n 2 --cov=spacetime --cov=unets --cov=diffusion --cov-report=term $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

# The demo (README command #1): train the moving-digits preset on the CPU within a wall-clock
# budget, sample the preset's 16 captions with DDIM, score them and print a summary. Two
# torch threads for the machine's two cores (1.8 vs 1.45 training steps/s measured); on a
# machine shared with other busy processes, DEMO_THREADS=1 cannot collapse the way
# oversubscribed threads do.
DEMO_DIR ?= runs/demo
DEMO_THREADS ?= 2
DEMO_ARGS ?=
SPACETIME = OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/spacetime --threads $(DEMO_THREADS)

demo: install
	@rm -rf $(DEMO_DIR)
	@start=$$(date +%s); \
	$(SPACETIME) train --preset moving-digits --out $(DEMO_DIR) --device cpu $(DEMO_ARGS) && \
	$(SPACETIME) -q sample --checkpoint $(DEMO_DIR) --out $(DEMO_DIR)/samples --device cpu && \
	$(SPACETIME) -q eval $(DEMO_DIR)/samples --out $(DEMO_DIR)/eval.json && \
	echo "demo finished in $$(( $$(date +%s) - start )) s: samples $(DEMO_DIR)/samples/*.gif," \
	     "loss plot $(DEMO_DIR)/loss.png, scores $(DEMO_DIR)/eval.json"

# Make-A-Video's cascade on the CPU: the base (16 px, 8 frames) and the interpolation stage
# (8 -> 29 frames) train side by side, one thread each, then the super-resolution stage
# (16 -> 32 px) on both threads; then 29-frame 32 px videos for the demo captions, scored
# (direction, digit, shape), and each stage scored on held-out digits against its baseline.
CASCADE_DIR ?= runs/cascade
ONE_THREAD = OMP_NUM_THREADS=1 $(BIN)/spacetime --threads 1

demo-cascade: install
	@rm -rf $(CASCADE_DIR)
	@mkdir -p $(CASCADE_DIR)
	@start=$$(date +%s); \
	$(ONE_THREAD) -q train --preset moving-digits --out $(CASCADE_DIR)/base --device cpu > $(CASCADE_DIR)/base.log 2>&1 & base=$$!; \
	$(ONE_THREAD) -q train --preset moving-digits-interp --out $(CASCADE_DIR)/interp --device cpu > $(CASCADE_DIR)/interp.log 2>&1 & interp=$$!; \
	wait $$base || { echo "base stage failed: $(CASCADE_DIR)/base.log"; exit 1; }; \
	wait $$interp || { echo "interpolation stage failed: $(CASCADE_DIR)/interp.log"; exit 1; }; \
	echo "base and interpolation stages trained in $$(( $$(date +%s) - start )) s"; \
	$(SPACETIME) -q train --preset moving-digits-sr --out $(CASCADE_DIR)/sr --device cpu && \
	echo "super-resolution stage trained; $$(( $$(date +%s) - start )) s so far" && \
	$(SPACETIME) sample --cascade base=$(CASCADE_DIR)/base,interp=$(CASCADE_DIR)/interp,sr=$(CASCADE_DIR)/sr \
	    --num-samples 1 --out $(CASCADE_DIR)/samples --device cpu && \
	$(SPACETIME) -q eval $(CASCADE_DIR)/samples --out $(CASCADE_DIR)/eval.json && \
	$(SPACETIME) -q eval --interp $(CASCADE_DIR)/interp --out $(CASCADE_DIR)/eval-interp.json && \
	$(SPACETIME) -q eval --sr $(CASCADE_DIR)/sr --out $(CASCADE_DIR)/eval-sr.json && \
	echo "demo-cascade finished in $$(( $$(date +%s) - start )) s: samples $(CASCADE_DIR)/samples/*.gif," \
	     "scores $(CASCADE_DIR)/eval*.json"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .coverage
