# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo teacher test test-damage bench bench-quick clean

setup: $(STAMP)

# torch must come with its own torchvision (PyPI's torchvision does not import beside a +cpu torch).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test,demo,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/logitcache demo --out demo_out

# The demo's teacher, trained once (about 15 minutes on 2 CPU cores) and shipped in cli/assets:
# the weights and their record (sha256, val top-1 on the demo's val split). make demo does not run it.
teacher: $(STAMP)
	$(BIN)/logitcache demo-teacher --work runs/demo_teacher

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The long run of the random-damage property test (tests/test_damage_property.py; make test runs 40
# derandomized examples): DAMAGE_EXAMPLES examples drawn from random seeds.
DAMAGE_EXAMPLES ?= 2000
test-damage: $(STAMP)
	LOGITCACHE_DAMAGE_EXAMPLES=$(DAMAGE_EXAMPLES) LOGITCACHE_DAMAGE_RANDOM=1 $(BIN)/python -m pytest -q --timeout 0 \
		--hypothesis-show-statistics \
		-p no:cacheprovider tests/test_damage_property.py

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

# The full suite: every performance benchmark, then the committed accuracy studies on make demo's
# workload (bench/README.md; --resume reuses finished student runs under runs/accuracy).
FIDELITY := ce,kd_cache,kd_online,kd_gap8,projector_cache,projector_online
bench: $(STAMP)
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.accuracy --datasets synth --seeds 5 --variants $(FIDELITY) \
		--output bench/results/accuracy.json --resume
	$(BIN)/python -m bench.accuracy.peer --seeds 5
	$(BIN)/python -m bench.accuracy --datasets synth --seeds 3 --variants ce,kd_cache,mkd,dkd,dist,prokt \
		--output bench/results/accuracy_methods.json --resume
	$(BIN)/python -m bench.report

clean:
	rm -rf demo_out runs .pytest_cache
