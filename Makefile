# msam: two commands on a fresh machine.
#   make run   - install, then start the service (embedded Redis when REDIS_URL is unset)
#   make test  - install, then run the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install tools run test bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP)

# External validators the tests run for real: dciodvfy (Debian package dicom3tools) checks every
# DICOM-SEG and RTSTRUCT the tests write.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
tools:
	command -v dciodvfy >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dicom3tools)

run: install
	@echo "The HTTP service is not built yet (issue #5). Available now: $(VENV)/bin/msam --help" >&2
	$(VENV)/bin/msam --help
	@exit 1

test: install tools
	$(PY) -m pytest -q -ra

bench: install
	$(PY) bench/model.py

clean:
	rm -rf $(VENV) .pytest_cache
