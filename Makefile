# The two entry points of the README; everything else is installed on demand.
PYTHON ?= python3
VENV := .venv

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python demo.py

# The docstring examples, then the tests. tests/test_dashboard.py needs headless
# Chromium: .ci/chromium installs it (as root on Debian) or says how, at once.
test: $(VENV)/.installed
	.ci/chromium
	$(VENV)/bin/python -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every benchmark in its small mode (tiny sizes, two nodes, seconds each): the
# same code paths as the full runs, failing on a crash. bench/broadcast.py
# needs root and `ip netns` (it fails, never skips, without them): CI is root.
.PHONY: bench-small
bench-small: $(VENV)/.installed
	$(VENV)/bin/python bench/pack.py --small
	$(VENV)/bin/python bench/broadcast.py --small
	$(VENV)/bin/python bench/bridge.py --small
	$(VENV)/bin/python bench/switch.py --small
	$(VENV)/bin/python bench/iterate.py --small
	$(VENV)/bin/python bench/spec.py --small
	$(VENV)/bin/python bench/soak.py --small
	$(VENV)/bin/python bench/zygote.py --small
	$(VENV)/bin/python bench/registry_load.py --small
	$(VENV)/bin/python bench/simulate.py --small
