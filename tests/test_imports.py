"""The runtime path must not pull in torch/transformers/optimum."""

import subprocess
import sys


def test_runtime_imports_no_torch():
    code = (
        "import sys, epic_ort, epic_ort.cli.main, epic_ort.decoding, epic_ort.epic.sampler, epic_ort.runtime;"
        "bad=[m for m in ('torch','transformers','optimum') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"heavy modules imported: {out.stdout} {out.stderr}"


def test_cli_help_does_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from epic_ort.cli.main import main;"
        "r=CliRunner().invoke(main, ['generate','--help']); assert r.exit_code==0, r.output;"
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
