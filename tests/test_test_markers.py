"""conftest's job detection: a test that starts another program is a ``job`` (make test-job),
not a ``unit`` test (make test-fast, which must stay under two minutes)."""

import textwrap
from types import SimpleNamespace

import pytest
from conftest import _launchers

pytestmark = pytest.mark.unit


def launchers_of(tmp_path, source: str) -> set[str]:
    path = tmp_path / "test_sample.py"
    path.write_text(textwrap.dedent(source))
    return _launchers(SimpleNamespace(__file__=str(path)))


@pytest.mark.parametrize("source", [
    "import multiprocessing as mp\ndef test_a():\n    mp.Process(target=print).start()\n",
    "import subprocess as sp\ndef test_a():\n    sp.run(['true'])\n",
    "from concurrent.futures import ProcessPoolExecutor\n"
    "def test_a():\n    ProcessPoolExecutor(2)\n",
    "import concurrent.futures\n"
    "def test_a():\n    concurrent.futures.ProcessPoolExecutor(2)\n",
    "def test_a():\n    import multiprocessing\n    multiprocessing.get_context('spawn')\n",
    "import sys\ndef helper():\n    return [sys.executable, '-c', 'pass']\n"
    "def test_a():\n    helper()\n",
], ids=["multiprocessing-as-mp", "subprocess-as-sp", "from-futures", "futures-attribute",
        "import-in-the-test", "argv-from-a-helper"])
def test_a_test_that_starts_a_process_is_a_job(tmp_path, source):
    assert "test_a" in launchers_of(tmp_path, source)


def test_a_test_that_only_names_a_launcher_is_not_a_job(tmp_path):
    source = '''
        import subprocess
        def test_a():
            """mpirun starts this elsewhere"""
            assert ["mpirun", "-np", "2"] == ["mpirun", "-np", "2"]
            assert subprocess.DEVNULL == -3
    '''
    assert "test_a" not in launchers_of(tmp_path, source)
