"""coun_tune.core must run on a box with torch alone: importing it (and the pipeline) must not
pull in ray, optuna or mlflow."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("ray", "optuna", "mlflow")


def _modules_after(code: str) -> dict:
    probe = (
        code
        + "\nimport sys, json\n"
        + f"heavy = {HEAVY!r}\n"
        + "print(json.dumps({'loaded': sorted(m for m in sys.modules if m.split('.')[0] in heavy),"
        + " 'core': 'coun_tune.core.pipeline' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_and_pipeline_import_without_ray_optuna_mlflow():
    result = _modules_after("import coun_tune.core\nimport coun_tune.core.pipeline")
    print("heavy modules loaded:", set(result["loaded"]))
    assert result["core"] is True
    assert set(result["loaded"]) == set()


def test_probe_detects_a_heavy_import():
    # the check above can fail: importing one of them directly is seen
    result = _modules_after("import coun_tune.core.pipeline\nimport optuna")
    assert "optuna" in result["loaded"]
