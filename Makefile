PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo demo-grid screenshots clean

# Re-install whenever pyproject.toml changes; torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest

# The paper's loss ablation in miniature on Fashion-MNIST, on this machine's CPUs (about 22 minutes on 2 cores,
# install included); the wall time is printed at the end.
demo:
	@start=$$(date +%s); $(MAKE) --no-print-directory demo-grid; status=$$?; seconds=$$(( $$(date +%s) - start )); \
	echo "make demo: $$((seconds / 60)) min $$((seconds % 60)) s, install included"; exit $$status

demo-grid: $(INSTALLED)
	bash scripts/install_debian.sh fashion-mnist
	$(VENV)/bin/clipkd grid submit grids/demo.yaml --executor local
	@echo
	$(VENV)/bin/clipkd ablation --paper --format markdown
	@echo
	@echo "Browse the results in the dashboard: $(VENV)/bin/clipkd app   then open http://127.0.0.1:8501"

# Retake the README's pictures (docs/*.png): the browser test over the demo grid's store (run `make demo` first).
screenshots: $(INSTALLED)
	CLIPKD_BROWSER_DB=sqlite:///results/clipkd.db CLIPKD_SCREENSHOTS=docs $(PY) -m pytest tests/test_browser.py -q

clean:
	rm -rf $(VENV) runs
