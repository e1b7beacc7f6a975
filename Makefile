# The two commands of the README: `make demo` and `make test`. Both create .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO_DIR ?= workdirs/demo
METHOD ?= mixmim
EXPERIMENT_DIR ?= workdirs/experiment/$(METHOD)
export TF_CPP_MIN_LOG_LEVEL := 2
export JAX_PLATFORMS ?= cpu

.PHONY: setup demo experiment test test-quick lint clean

setup: $(VENV)/.installed

# Re-created when the pins change; `pip install -e .` puts the console scripts in .venv/bin.
# The TPU and GPU compilers of `mixmae-bench --topology` go outside the venv's import path
# (requirements-accelerators.txt says why); mixmae_jax/train/aot.py finds them there.
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-no-deps.txt \
		requirements-accelerators.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-no-deps.txt
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/accelerators \
	  -r requirements-accelerators.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# A real pretraining run on the embedded photo crops (CPU, a few minutes), then a
# reconstruction picture and a PyTorch checkpoint converted from the final step (--overwrite:
# a second `make demo` resumes the finished run and writes both again).
demo: setup
	$(BIN)/mixmae-pretrain --config configs/demo.py --workdir $(DEMO_DIR)
	$(BIN)/mixmae-visualize --workdir $(DEMO_DIR) --out $(DEMO_DIR)/reconstruction.png --overwrite \
	  --images $$($(PY) -c "import skimage, os; d = os.path.join(os.path.dirname(skimage.__file__), 'data'); print(' '.join(os.path.join(d, f) for f in ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg')))")
	$(BIN)/mixmae-convert to-torch --workdir $(DEMO_DIR) --out $(DEMO_DIR)/mixmim_demo_pretrain.pth \
	  --overwrite
	@echo
	@echo "Demo outputs:"
	@echo "  checkpoints (Orbax):      $(DEMO_DIR)/checkpoints/"
	@echo "  config snapshot:          $(DEMO_DIR)/config.json"
	@echo "  metrics (JSON lines):     $(DEMO_DIR)/metrics.jsonl"
	@echo "  TensorBoard:              $(BIN)/tensorboard --logdir $(DEMO_DIR)/tensorboard"
	@echo "  reconstructions (PNG):    $(DEMO_DIR)/reconstruction.png"
	@echo "  PyTorch checkpoint:       $(DEMO_DIR)/mixmim_demo_pretrain.pth"

# The digits experiment (README, "Does pretraining help?"): METHOD's pretraining (mixmim, mae,
# mixedae, ummae, simmim) on the digits images, then frozen and fine-tuned evaluation against
# random init, 3 seeds (< 30 min on CPU per method).
experiment: setup
	$(PY) -m mixmae_jax.digits_experiment --method $(METHOD) --workdir $(EXPERIMENT_DIR)

# One pytest worker per core (TEST_WORKERS=0 runs in-process): compiling XLA programs, which is
# most of the suite's time, uses one thread. --dist loadfile keeps each file's shared compiled
# functions in one worker; --no-loadscope-reorder hands out the files in the order
# tests/conftest.py gives them (the longest first).
TEST_WORKERS ?= 2
PYTEST = $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup
	$(PYTEST)

# The quick inner loop: every test over ~5 s is marked slow (pytest.ini).
test-quick: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO_DIR) workdirs/experiment .pytest_cache
