"""The README's quick start (examples/quickstart.py) runs and does what the README says."""

import importlib.util
from pathlib import Path


def test_quickstart_lowers_the_meta_objective(capsys):
    path = Path(__file__).parent.parent / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    start, end = (float(x) for x in last.split(";")[0].split()[1::2])
    assert start > 4 and end < 0.25, last
