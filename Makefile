# The README's two commands: `make demo` and `make test`. Both set up .venv on their own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the stamp is newer than every input once set-up has finished; a second `make setup` is a no-op
STAMP := $(VENV)/.mocobench-setup
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slurm slurm-setup lint demo clean mutation

setup: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]' $(TORCH_PINS)
	$(PY) tools/install_detectron2.py $(VENV)/d2cache
	$(VENV)/bin/mocobench env > /dev/null
	touch $@

# two pytest-xdist workers: the suite is mostly single-process training and subprocesses, so 2 cores halve it
test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 -m "not slurm" tests

# the slurm tier: the scale path on a real one-node SLURM on localhost (tests/slurm_cluster.py starts
# munged, slurmctld and slurmd of Debian's slurm-wlm and stops them when the tier ends; root only).
# A cluster that cannot start fails every test of the tier with the reason.
test-slurm: setup slurm-setup
	$(PY) -m pytest -q -m slurm tests/test_slurm.py

slurm-setup:
	command -v slurmctld > /dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm \
		|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm; }

# the embedded demo: generated data -> MoCo -> convert -> VOC-format detection x3 inits x3 seeds -> report
demo: setup
	$(VENV)/bin/mocobench pipeline --config-file configs/pipeline/demo_cpu.yaml

# mutation testing of the modules that carry the science and the numbers (mutmut, config in setup.cfg); not part
# of `make test`. A whole run is hours on 2 cores (5,746 mutants), so by default it runs a seeded random sample of
# MUTATION_SAMPLE mutants per module (MUTATION_SAMPLE=0: every mutant) in one mutmut run, then scores the sample
# with a 95 % interval per module. Results stay in ./mutants (`mutmut show NAME` shows a mutant's diff).
MUTATION_MODULES ?= pretrain.resume mocobench.utils.preempt pretrain.checkpoint mocobench.utils.fileio transfer.run \
    transfer.evaluation transfer.record mocobench.launch mocobench.pipeline \
    pretrain.moco pretrain.config pretrain.augment transfer.datasets convert transfer.report transfer.stats
MUTATION_SAMPLE ?= 30
MUTATION_SEED ?= 20261207
MUTATION_JOBS ?= 2
mutation: setup
	mkdir -p mutants
	$(PY) tools/mutation.py sample --per-module $(MUTATION_SAMPLE) --seed $(MUTATION_SEED) $(MUTATION_MODULES) > mutants/sample.txt
	nice -n 10 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $$(cat mutants/sample.txt)
	$(PY) tools/mutation.py score --sample mutants/sample.txt

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache mutants
