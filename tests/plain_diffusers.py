"""The one way tests run code the way a user without stepdistill would: ``run_without_stepdistill``.

An exported folder must work in plain diffusers, so the checks that load one run in a fresh Python process
(``sys.executable``) that never imports stepdistill: no PYTHONPATH (the repository is not on the path), offline
(``HF_HUB_OFFLINE=1``), started from the test's own folder. This machine's environment may still be able to import
stepdistill (an editable install), so the helper does not only hope: after the code has run, the process reports
every ``stepdistill`` module it holds, and the helper fails the test if there is one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Runs the test's code as ``__main__`` with ``sys.argv = [<code file>, <spec.json>]``, then, whatever the code did,
# writes the names of the stepdistill modules it left in ``sys.modules``.
_WRAPPER = r"""
import json, sys
code_file, modules_file, spec_file = sys.argv[1:4]
sys.argv = [code_file, spec_file]
try:
    with open(code_file, encoding="utf-8") as f:
        exec(compile(f.read(), code_file, "exec"), {"__name__": "__main__", "__file__": code_file})
finally:
    with open(modules_file, "w", encoding="utf-8") as f:
        json.dump(sorted(m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill.")), f)
"""


def run_without_stepdistill(code: str, spec: dict, folder: str | Path, timeout: int = 600) -> dict:
    """Run ``code`` (a script reading ``sys.argv[1]``, a JSON spec, and writing the JSON report ``spec["report"]``) in
    a fresh ``sys.executable`` process that must never import stepdistill (no PYTHONPATH, ``HF_HUB_OFFLINE=1``, working
    directory ``folder``). Fails the test when the process fails or imported stepdistill; returns the report with
    ``"stepdistill_modules"`` (the stepdistill modules the process held at its end: always ``[]`` here) added."""
    folder = Path(folder)
    (folder / "spec.json").write_text(json.dumps(spec))
    code_file = folder / "plain_diffusers_code.py"
    code_file.write_text(code, encoding="utf-8")
    modules_file = folder / "plain_diffusers_modules.json"
    modules_file.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(code_file), str(modules_file), str(folder / "spec.json")],
                          cwd=str(folder), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    imported = json.loads(modules_file.read_text())
    assert imported == [], f"the plain-diffusers process imported stepdistill: {imported}"
    report = json.loads(Path(spec["report"]).read_text())
    report["stepdistill_modules"] = imported
    return report
