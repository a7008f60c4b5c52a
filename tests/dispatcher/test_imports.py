"""The dispatcher image carries no torch: importing it must not pull torch in."""

from __future__ import annotations

import subprocess
import sys


def test_import_dispatcher_does_not_import_torch():
    code = (
        "import sys, dispatcher, dispatcher.__main__, dispatcher.app, dispatcher.simulator; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_main_refuses_incomplete_configuration():
    result = subprocess.run(
        [sys.executable, "-m", "dispatcher"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "SDEKS_OUTPUT_BUCKET": "b"},
    )
    assert result.returncode == 2
    assert "callback_topic_arn" in result.stderr
