PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo clean

# Re-install whenever pyproject.toml changes; torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest

# The paper's loss ablation in miniature on Fashion-MNIST, on this machine's CPUs (about 20 minutes on 2 cores).
demo: $(INSTALLED)
	bash scripts/install_debian.sh fashion-mnist
	$(VENV)/bin/clipkd grid submit grids/demo.yaml --executor local
	@echo
	$(VENV)/bin/clipkd ablation --format markdown
	@echo
	@echo "Browse the results in the dashboard: $(VENV)/bin/clipkd app   then open http://127.0.0.1:8501"

clean:
	rm -rf $(VENV) runs
