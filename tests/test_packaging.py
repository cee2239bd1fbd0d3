"""What a fresh install reads: pyproject's metadata installs quietly and resolves with the pip that
`python3 -m venv` ships, and README's Python snippets run as they are (on the real model)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_string():
    """A TOML table here makes setuptools print a deprecation box three times per install."""
    project = _pyproject()["project"]
    assert isinstance(project["license"], str) and re.fullmatch(r"[A-Za-z0-9.\-+ ]+", project["license"])
    requires = _pyproject()["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires)


def test_no_extra_installs_the_gpu_build_beside_the_cpu_build():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert not [e for e, deps in extras.items() if any(d.startswith("onnxruntime-gpu") for d in deps)]


def test_export_pins_resolve_together():
    """optimum-onnx 0.1.0 requires optimum~=2.1.0: a looser pin lets an older pip pick optimum 2.3
    and fail with InconsistentCandidate."""
    export = _pyproject()["project"]["optional-dependencies"]["export"]
    assert "optimum-onnx==0.1.0" in export
    assert "optimum~=2.1.0" in export
    assert any(d.startswith("transformers") and "<4.58" in d for d in export)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.integration
def test_readme_python_snippets_run_on_their_own(smollm2_dir):
    blocks = _python_blocks((ROOT / "README.md").read_text())
    blocks = [b for b in blocks if "OpenAI(" not in b]  # talks to a running server: tests/test_serve.py does that
    assert len(blocks) >= 3
    for code in blocks:
        code = code.replace('"models/smollm2-135m"', repr(str(smollm2_dir)))
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"README snippet failed:\n{code}\n{out.stderr[-2000:]}"
