PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test demo clean

# Re-install whenever pyproject.toml changes; torch 2.14.1 / torchvision 0.29.1 come from this machine's disk.
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest

demo: $(INSTALLED)
	@echo "make demo will run grids/demo.yaml (fashion-mnist: a teacher, then a student per method, two seeds)"
	@echo "and print the ablation table. It waits for the ablation grid and the results store (issues 3 and 4)."
	@echo "Today you can train single runs, e.g.:"
	@echo "  $(VENV)/bin/clipkd train configs/smoke_teacher.yaml && $(VENV)/bin/clipkd train configs/smoke_kd.yaml"

clean:
	rm -rf $(VENV) runs
