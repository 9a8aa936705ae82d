"""``import eva_kernels`` stays light for the libraries that import it (issue 23): no
transformers, peft, accelerate or matplotlib, checked in a fresh interpreter's ``sys.modules``."""
from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("transformers", "peft", "accelerate", "matplotlib")


def test_import_eva_kernels_pulls_in_no_model_library():
    code = ("import json, sys, eva_kernels; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules or any(k.startswith(m + '.') for k in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
