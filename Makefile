# Two entry points for a fresh machine with only Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo lint test test-fast install clean bench

# pip -qq: errors only; one -q still prints a warning per unreachable index a machine's pip config
# names (hundreds of lines on some CI images), which buries the demo's own output.
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/showtell run --config configs/local.yaml

# The report pages' tests screenshot them in Debian's headless Chromium (CI runs as root; elsewhere,
# install the `chromium` package once by hand).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# ruff, configured in pyproject.toml: unused and undefined names, import order, bugbear, line length.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint $(CHROMIUM)
	$(PY) -m pytest -q tests

test-fast: lint $(CHROMIUM)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) benchmarks/preprocess_bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache
