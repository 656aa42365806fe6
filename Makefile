# Fresh machine: `make chat` (set up, then chat with the bundled model) or `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
JOBS   ?=

.PHONY: setup chat test test-native-sanitize clean-venv

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PY) -m pip install -q --disable-pip-version-check "llama-cpp-python==0.3.36"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[build,test,bench,server]"
	touch $@

setup: $(VENV)/.installed
	$(PY) -m iceformer_llama setup $(if $(JOBS),-j $(JOBS))

chat: setup
	$(PY) -m iceformer_llama chat

test: $(VENV)/.installed
	$(PY) -m iceformer_llama setup --stock $(if $(JOBS),-j $(JOBS))
	$(PY) -m pytest -q -rs tests
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/native_sanitize.sh

clean-venv:
	rm -rf $(VENV)
