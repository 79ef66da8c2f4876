# coinfer: `make run` and `make test` set everything up themselves on a fresh Debian-like machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is only for training (the `train` extra); this pin matches the wheel the build machines carry.
TORCH_SPEC ?= torch==2.13.0
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench bench-pipeline bench-pipeline-testbed bench-edgent bench-edgent-dag bench-load deploy-check system-deps clean

run: $(STAMP) system-deps
	@echo "== co-inference: mosquitto + edged + deviced on this machine, real Fashion-MNIST images =="
	$(VENV)/bin/coinfer demo --links 50kbps,200kbps,2Mbps --deadline 200ms --images 300
	@echo
	@echo "== what the planner chooses over a bandwidth sweep (Edgent reference models, Pi 3 -> desktop) =="
	$(VENV)/bin/coinfer sweep --deadlines 200ms

test: $(STAMP) system-deps lint typecheck unit

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy

unit: $(STAMP) system-deps
	$(PY) -m pytest -q

bench: $(STAMP) system-deps
	mkdir -p bench-results
	$(VENV)/bin/coinfer bench planner --out bench-results/planner.json
	$(VENV)/bin/coinfer bench transport --out bench-results/transport.json
	$(VENV)/bin/coinfer bench dag --out bench-results/dag

# The pipeline planner on the example fleet, checked by simulation (~2 minutes). Results: docs/results/pipeline.
bench-pipeline: $(STAMP)
	$(VENV)/bin/coinfer bench pipeline --sim --out docs/results/pipeline

# Streams through deviced on the fleet testbed (root; ~30 minutes). Results: docs/results/pipeline/testbed.*.
bench-pipeline-testbed: $(STAMP) system-deps
	$(SUDO) $(VENV)/bin/coinfer bench pipeline --out docs/results/pipeline

# The Edgent experiments on the namespace testbed (root; ~16 minutes). Results: docs/results/edgent.
bench-edgent: $(STAMP) system-deps
	$(SUDO) $(VENV)/bin/coinfer bench edgent --out docs/results/edgent

# The heavy DAG bundle on the same testbed, planned by the min-cut (root; ~25 minutes). Results: docs/results/edgent-dag56.
bench-edgent-dag: $(STAMP) system-deps
	$(SUDO) $(VENV)/bin/coinfer bench edgent --bundle models/bundles/fmnist56-branchy-resnet --policy mincut \
		--cpu-quota 0.05 --out docs/results/edgent-dag56

# Many devices against 1 and 2 edged, a 3-minute soak, faults under load (loopback; ~6 minutes).
bench-load: $(STAMP) system-deps
	$(VENV)/bin/coinfer bench load --out docs/results/load/load.json

# The README's deployment steps for an edge and a device on this machine, in a scratch root (root; installs
# Debian packages; under 2 minutes). Not part of `make test`.
deploy-check: $(STAMP)
	$(SUDO) $(PY) -m coinfer.ops.deploycheck

system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,train,bench]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
