"""fdl._malloc: glibc settings applied at import, with an opt-out."""

import subprocess
import sys

import pytest

CODE = "import fdl, fdl._malloc as m; print(m.configured)"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("env, want", [({}, "True"), ({"FDL_MALLOC": "default"}, "False")])
def test_configured_at_import_unless_opted_out(env, want, monkeypatch):
    monkeypatch.delenv("FDL_MALLOC", raising=False)
    import os

    out = subprocess.run([sys.executable, "-c", CODE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == want
