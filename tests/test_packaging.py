"""The package's shape: the core leaves the tooling alone, plotting is an extra."""
from __future__ import annotations

import json
import subprocess
import sys

from test_plot import report

from migrate import spawn

_CORE_IMPORTS = """
import sys
import migrate.agent, migrate.cli
tooling = ("migrate.lab", "migrate.bench", "migrate.plot", "migrate.certs", "matplotlib")
print(sorted(m for m in sys.modules if m.startswith(tooling)))
"""


def test_agents_and_the_cli_import_no_tooling() -> None:
    """lab, bench, plot and certs (and matplotlib) load only when their command runs."""
    out = subprocess.run([sys.executable, "-P", "-c", _CORE_IMPORTS], check=False, capture_output=True, text=True,
                         timeout=120, env=spawn.child_env(), stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


_PLOT_WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if the plot extra were not installed
from migrate.cli import main
sys.argv = ["migrate", "plot", sys.argv[1], "-o", sys.argv[2]]
main()
"""


def test_plot_without_matplotlib_names_the_extra_in_one_line(tmp_path) -> None:
    src = tmp_path / "vm1.json"
    src.write_text(json.dumps(report()))
    out = subprocess.run([sys.executable, "-P", "-c", _PLOT_WITHOUT_MATPLOTLIB, str(src), str(tmp_path / "x.png")],
                         check=False, capture_output=True, text=True, timeout=120, env=spawn.child_env(),
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["error: plotting needs matplotlib: pip install 'migrate[plot]'"]
