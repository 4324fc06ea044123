# The two set-up commands of the README, and the benchmarks. Each target creates the
# project's virtual environment (.venv) on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
# CPU build from local disk on our machines; on a GPU box use e.g. TORCH_SPEC="torch>=2.4".
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test bench quality quality-quick clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed  ## the main job end to end on the embedded default
	$(BIN)/logitcache demo --out demo-out

test: $(VENV)/.installed  ## the test suite (what CI runs)
	$(BIN)/python -m pytest

# The peers benchmarks/peers.py compares with, for the benchmark alone (not dependencies of the
# package). --no-deps: Liger-Kernel's chunked losses need only torch (its Triton kernels are
# GPU-only), and peers.py loads torchtune's loss file without torchtune's own dependencies.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-deps "liger-kernel==0.8.5" "torchtune==0.6.1"
	touch $@

bench: $(VENV)/.bench-installed  ## benchmarks; results in benchmarks/RESULTS.md
	$(BIN)/python benchmarks/stage1.py
	$(BIN)/python benchmarks/stage2.py
	$(BIN)/python benchmarks/stage2.py --student 100m
	$(BIN)/python benchmarks/losses_memory.py
	$(BIN)/python benchmarks/fused_linear.py
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/remote_read.py  # S3 on loopback vs local disk (issue 16)
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/finite_checks.py

# The quality benchmark draws a chart; matplotlib is for it alone, not a dependency of the package.
$(VENV)/.quality-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet "matplotlib>=3.7"
	touch $@

quality: $(VENV)/.quality-installed  ## KD vs SFT on real text, 3 seeds, with the two-teacher and sampled-target rows (about 80 min on 2 cores from an empty cache, the teachers' training included; later runs reuse them), then sampled targets vs top-k on the demo's tiny teacher, the codec and the reader on its teacher; results in benchmarks/RESULTS.md
	$(BIN)/python benchmarks/quality.py --multi-teacher --sampled $(QUALITY_ARGS)
	$(BIN)/python benchmarks/sampled_targets.py --seeds 3
	$(BIN)/python benchmarks/codec_real.py  # the codec on the quality teacher (issue 17 §3)
	$(BIN)/python benchmarks/reader_vs_datasets.py  # the stage-2 reader vs datasets streaming

quality-quick: $(VENV)/.quality-installed  ## the same pipeline on small data, 1 seed (a few minutes)
	$(BIN)/python benchmarks/quality.py --quick

clean:
	rm -rf demo-out .pytest_cache
