# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: this machine kind has that CPU build on disk, and any
# other torch spec would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo-out

.PHONY: demo test bench fixtures clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	touch $@

$(VENV)/.installed-test: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-demo: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[onnx]'
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --dist loadscope

demo: $(VENV)/.installed-demo
	@rm -rf $(DEMO)
	@echo "$$ ia3tools inspect fixtures/llama/adapter"; $(VENV)/bin/ia3tools inspect fixtures/llama/adapter
	@echo "$$ ia3tools check fixtures/llama/base fixtures/llama/adapter"; $(VENV)/bin/ia3tools check fixtures/llama/base fixtures/llama/adapter
	@echo "$$ ia3tools merge fixtures/llama/base fixtures/llama/adapter -o $(DEMO)/merged"; $(VENV)/bin/ia3tools merge fixtures/llama/base fixtures/llama/adapter -o $(DEMO)/merged
	@echo "$$ ia3tools verify fixtures/llama/base fixtures/llama/adapter $(DEMO)/merged"; $(VENV)/bin/ia3tools verify fixtures/llama/base fixtures/llama/adapter $(DEMO)/merged
	@echo "$$ ia3tools extract fixtures/llama/base $(DEMO)/merged -o $(DEMO)/extracted"; $(VENV)/bin/ia3tools extract fixtures/llama/base $(DEMO)/merged -o $(DEMO)/extracted
	@echo "$$ ia3tools verify fixtures/llama/base $(DEMO)/extracted $(DEMO)/merged"; $(VENV)/bin/ia3tools verify fixtures/llama/base $(DEMO)/extracted $(DEMO)/merged
	@echo "$$ ia3tools export-onnx $(DEMO)/merged -o $(DEMO)/onnx"; $(VENV)/bin/ia3tools export-onnx $(DEMO)/merged -o $(DEMO)/onnx

$(VENV)/.installed-bench: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

# Regenerates bench/out/results.{json,png} (sizes in GB: make bench SIZES="2 8").
SIZES ?= 2
bench: $(VENV)/.installed-bench
	$(PY) bench/run.py --sizes $(SIZES) --cleanup

# Regenerate the checked-in fixtures (deterministic; needs the test extras for peft).
fixtures: $(VENV)/.installed-test
	$(PY) fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
