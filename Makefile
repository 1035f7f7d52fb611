# edgeloop — two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test lint bench chaos venv dev mosquitto browser promtool clean

$(VENV)/.base: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PIP) install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.base
dev: $(VENV)/.dev

# Mosquitto is a real broker the tests start on free ports; install it when missing and we are root.
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	  else echo "mosquitto is missing: install it (apt-get install mosquitto) to run the MQTT tests"; fi; \
	fi

# promtool (Debian's prometheus package) checks the alert rules and runs their unit tests.
promtool:
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else echo "promtool is missing: install it (apt-get install prometheus) to check the alert rules"; fi; \
	fi

# The dashboard test drives a real headless Chromium through Debian's chromedriver (selenium
# never downloads a browser or a driver); install both when missing and we are root.
browser:
	@if ! test -x /usr/bin/chromium || ! test -x /usr/bin/chromedriver; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	  else echo "chromium is missing: install it (apt-get install chromium chromium-driver) to run the dashboard tests"; fi; \
	fi

demo: $(VENV)/.base
	$(VENV)/bin/edgeloop demo

lint: $(VENV)/.dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(VENV)/.dev mosquitto browser promtool lint
	$(VENV)/bin/pytest

bench: $(VENV)/.dev mosquitto
	$(PY) -m bench

# The chaos suite (docs/reliability.md): every scenario at full length against real processes,
# one row per scenario; exits 1 when anything was lost or applied twice.
chaos: $(VENV)/.dev mosquitto
	$(PY) -m tests.chaos

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
