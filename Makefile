# Developer entry points. `make test` and `make demo` set the environment up on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
# one pytest worker per core, each test to whichever worker is free (the slowest take minutes)
SPREAD := -n auto --dist worksteal
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test lint demo demo-full bench clean

setup: $(STAMP)

# Debian's chromium for the browser tests: Playwright drives this one and never downloads a browser.
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium

# torch is pinned as 2.13.0+cpu: only the CPU wheel on local disk matches, so pip can never
# pull a multi-GB CUDA build from the registry.
$(STAMP): requirements/test.txt requirements/nodeps.txt | $(CHROMIUM)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (the host runs 3.10/3.11); found " + sys.version' 
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements/test.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/nodeps.txt
	touch $(STAMP)

# The same suite on torch 2.1.2 (requirements/compat.txt), in its own venv.
CVENV := .venv-compat
CVPY := $(CVENV)/bin/python
CSTAMP := $(CVENV)/.installed

$(CSTAMP): requirements/test.txt requirements/compat.txt requirements/nodeps.txt | $(CHROMIUM)
	@$(PY) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (the host runs 3.10/3.11); found " + sys.version'
	$(PY) -m venv $(CVENV)
	grep -v '^torch[=<>!~ ]' requirements/test.txt > $(CVENV)/shared.txt
	$(CVPY) -m pip install -q --disable-pip-version-check -r $(CVENV)/shared.txt -r requirements/compat.txt
	$(CVPY) -m pip install -q --disable-pip-version-check --no-deps -r requirements/nodeps.txt
	touch $(CSTAMP)

.PHONY: test-compat
test-compat: $(CSTAMP)
	$(CVPY) -m pytest -q $(SPREAD)

# The extension inside a real AUTOMATIC1111 v1.10.1 (see tests/realhost); skipped without MOS_WEBUI.
# The SDXL module needs about 17 GB of RAM for the host alone: it runs on its own.
.PHONY: test-realhost test-realhost-sdxl
test-realhost: setup
	$(VPY) -m pytest -v -rA -s tests/realhost/test_realhost.py

test-realhost-sdxl: setup
	$(VPY) -m pytest -v -rA -s tests/realhost/test_realhost_sdxl.py

# The extension inside a real Forge (see docs/testing.md); skipped without MOS_FORGE.
.PHONY: test-realforge
test-realforge: setup
	$(VPY) -m pytest -v -rA -s tests/realhost/test_realforge.py

.PHONY: test-realforge-sdxl
test-realforge-sdxl: setup
	$(VPY) -m pytest -v -rA -s tests/realhost/test_realforge_sdxl.py

.PHONY: test-realforge-classic
test-realforge-classic: setup
	$(VPY) -m pytest -v -rA -s tests/realhost/test_realforge_classic.py

lint: setup
	$(VPY) -m ruff check .

test: setup lint
	$(VPY) -m pytest -q $(SPREAD)

# the quick demo (a few minutes on 2 CPU cores); demo-full runs every step longer
demo: setup
	$(VPY) -m lib_mos demo --out outputs

demo-full: setup
	$(VPY) -m lib_mos demo --full --out outputs

bench: setup
	for b in bench/*.py; do $(VPY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(CVENV) outputs .pytest_cache .ruff_cache
