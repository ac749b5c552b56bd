"""The lab's test suite: `python test_all.py` (what `make test` runs) runs every test in
tests/, one file per script: test_features, test_logreg, test_vae, test_experiments,
test_make, test_make_settings and test_lab. pytest's flags pass through:
`python test_all.py -k vae`.

The tests run side by side, one process per core (pytest-xdist); `-n 0` runs them
one after the other.
Runs offline and without ../shared: tiny MNIST-format IDX files are built in temp
dirs. Tests that need the real MNIST read $MNIST_ROOT and are skipped without it.
"""
import importlib.util
import os
import sys

import pytest

if __name__ == "__main__":
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    parallel = ["-n", "auto"] if importlib.util.find_spec("xdist") else []
    sys.exit(pytest.main([tests, "-q", *parallel, *sys.argv[1:]]))
