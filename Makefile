# One virtual environment for everything: make demo, make test, make lint, make bench.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# torch 2.13.0 is the CPU build on our CI machine's disk; elsewhere pip takes PyPI's build.
# Give TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only build on any machine.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.11,<2.15" || echo "torch==2.13.0")
TORCH_INDEX ?=
DEMO_DIR ?= out/tinycode

.PHONY: venv demo test test-cuda test-interpret lint format bench bench-serve clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(VENV)/bin/oiv2compile build tinycode -o $(DEMO_DIR) --force
	$(VENV)/bin/oiv2compile run $(DEMO_DIR) --echo --prompt "$$(printf 'def fibonacci(n):\n    if n')" --max-new-tokens 48

# Test files spread over TEST_WORKERS processes (a file's tests stay in one, with its fixtures).
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-cuda: venv
	$(PY) -m pytest -q -m cuda

# The Triton kernels in Triton's CPU interpreter (needs Triton installed, as on the GPU machine).
test-interpret: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not cuda" tests/kernels/test_attention.py tests/kernels/test_rope_kv_write.py \
		tests/kernels/test_rope_kv_write_attention.py

lint: venv
	$(VENV)/bin/ruff check oiv2compile tests benchmarks tools
	$(VENV)/bin/ruff format --check oiv2compile tests benchmarks tools
	$(VENV)/bin/mypy

format: venv
	$(VENV)/bin/ruff format oiv2compile tests benchmarks tools
	$(VENV)/bin/ruff check --fix oiv2compile tests benchmarks tools

# Every backend, quantization and batch size against the HF baselines (GPU); JSON and plots in the --out folders.
# benchmarks/bench_generate.py reruns the batch-1 setup of the rows in benchmarks/RESULTS.md.
BENCH_ARGS ?= --quant none,int8,int4 --batch-sizes 1,8,32 --repeats 3

bench: venv
	$(VENV)/bin/oiv2compile bench llama-1b $(BENCH_ARGS) --out benchmarks/results/llama-1b
	$(VENV)/bin/oiv2compile bench llama-8b $(BENCH_ARGS) --out benchmarks/results/llama-8b

# oiv2compile serve on llama-8b (GPU) under 1, 8, 32 and 64 concurrent clients: serve.json and serve.md.
SERVE_ARTIFACT ?= out/llama-8b

bench-serve: venv
	test -d $(SERVE_ARTIFACT) || $(VENV)/bin/oiv2compile build llama-8b -o $(SERVE_ARTIFACT) --max-batch-size 64 --max-seq-len 512
	$(PY) benchmarks/bench_serve.py --serve $(SERVE_ARTIFACT) --clients 1,8,32,64 --requests 32,128,256,256 \
		--prompt-len 128 --output-len 128 --out benchmarks/results/serve-llama-8b

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
