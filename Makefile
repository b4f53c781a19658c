# hpctrain's make targets, and what each runs:
#   setup            .venv, pinned torch, mpi4py, Horovod (idempotent; test targets add --tests)
#   demo             dcasgd-a on 4 ranks, LeNet on Fashion-MNIST, then its results table
#   lint             ruff check .
#   typecheck        mypy on hpctrain, with pyproject.toml's [tool.mypy] settings
#   test-fast        the unit tests only (-m unit: no job launched; two pytest workers)
#   test-unit        every single-process test, unit and job (TEST_WORKERS pytest workers)
#   test-mpi         the mpi tests inside mpirun -np 2, then -np 4 (Open MPI)
#   test-other-mpis  the mpi tests inside mpirun -np 2 of MPICH and of Intel MPI (OTHER_MPIS)
#   test             lint, typecheck, test-unit, test-mpi, then test-other-mpis on MPICH only
#   clean            removes .venv, build, *.egg-info and runs
SHELL := /bin/bash
PY := .venv/bin/python
# Root needs --allow-run-as-root; more ranks than cores need --oversubscribe.
MPIRUN := mpirun --oversubscribe $(if $(filter 0,$(shell id -u)),--allow-run-as-root) \
	-x OMPI_MCA_osc=^ucx -x OMPI_MCA_pml=ob1 -x OMPI_MCA_btl=self,vader,tcp
# timeout_method=thread: a rank stuck in an MPI call is ended (its stacks dumped, then the
# process exits and mpirun ends the job); the default signal method cannot interrupt C code.
PYTEST_MPI := $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi -o timeout_method=thread
export OMP_NUM_THREADS := 1
# Let Python cache bytecode (some shells set PYTHONDONTWRITEBYTECODE): each of the suite's
# hundreds of rank starts would otherwise compile hpctrain's 17k lines, and the parts of the
# venv that setup.sh's warm-up import did not reach, again.
unexport PYTHONDONTWRITEBYTECODE
export HPCTRAIN_MPIRUN := $(MPIRUN)

.PHONY: setup demo test test-fast test-unit test-mpi test-other-mpis lint typecheck clean

# The test targets set up what only the suite needs as well (setup.sh --tests: a one-node
# Slurm, MPICH's and Intel MPI's wheels); a target-specific value reaches its prerequisites.
setup:
	@scripts/setup.sh $(SETUP_FLAGS)
test test-unit test-mpi test-other-mpis: SETUP_FLAGS := --tests

demo: setup
	@scripts/demo.sh

lint: setup
	$(PY) -m ruff check .

# mypy comes pinned with the test extra (setup.py), as ruff does; its settings and the
# third-party modules it reads without types are pyproject.toml's [tool.mypy].
typecheck: setup
	$(PY) -m mypy

# Unit tests only (no job launched): what to run while working. Two pytest workers, one a
# core: in one, 93 s on a 2-core VM at a load average of 2, 159 s at 8 (two: 130 s at 8).
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m unit tests

# Three pytest workers, a test file each (its module fixtures stay shared): job tests spend
# much of their time waiting on launches, drills and Slurm, so three overlap on two cores
# (a three-worker run passed whole under a load average of 10). Files go
# out in conftest's order, the longest first (xdist's own puts the files with most tests
# first, which left test_slurm.py's minutes for the end). The slowest 25 are listed at the
# end: keep conftest's order true to them.
TEST_WORKERS ?= 3
test-unit: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder --durations=25 tests

# Each MPI size is one mpirun; a hang is ended by pytest-timeout inside (the first hung test
# ends that mpirun) and `timeout` outside.
# Every rank imports what it collects, so only the files that hold MPI tests are given.
MPI_TEST_FILES = $(shell grep -l 'pytest.mark.mpi' tests/test_*.py)
test-mpi: setup
	timeout 900 $(MPIRUN) -np 2 $(PYTEST_MPI) $(MPI_TEST_FILES); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || exit $$s
	timeout 900 $(MPIRUN) -np 4 $(PYTEST_MPI) $(MPI_TEST_FILES); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || exit $$s

# The MPI phase again on MPICH and on Intel MPI (setup.sh --tests puts their wheels in
# .venv/mpich and .venv/impi): the collectives, the RMA store and the Horovod-shaped API on two
# more MPI implementations (Horovod's own backend is skipped: it is built with Open MPI). Two ranks:
# Hydra's MPIs poll for progress, which makes more ranks than cores slow. `make test` runs it
# on MPICH only, to stay in CI's time (Intel MPI is MPICH's kin; its job tests still run).
OTHER_MPIS ?= mpich impi
test-other-mpis: setup
	@for m in $(OTHER_MPIS); do d=$(CURDIR)/.venv/$$m; \
	  if [ ! -x $$d/bin/mpirun ]; then echo "test-other-mpis: no $$m in $$d, skipped"; continue; fi; \
	  echo "test-other-mpis: $$m"; \
	  PATH=$$d/bin:$$PATH LD_LIBRARY_PATH=$$d/lib timeout 600 mpirun -np 2 \
	    $(PYTEST_MPI) $(MPI_TEST_FILES); s=$$?; [ $$s -eq 0 ] || [ $$s -eq 5 ] || exit $$s; \
	done

test: lint typecheck test-unit test-mpi test-other-mpis
test: OTHER_MPIS := mpich

clean:
	rm -rf .venv build *.egg-info runs
