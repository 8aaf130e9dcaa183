"""``end_process``: the exit status, flushed logs and streams, and no finalisation."""

import subprocess
import sys

SCRIPT = """
import atexit, logging, sys
from muse_torchrec.process import end_process
atexit.register(print, "finalised")
logging.basicConfig(stream=sys.stderr)
logging.getLogger("check").warning("logged")
print("printed", end="")
end_process(3)
"""


def test_end_process_flushes_and_exits_with_the_code_without_finalising():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert result.stdout == "printed"  # a pipe: block-buffered, so this is the flush
    assert "logged" in result.stderr


def test_the_cli_process_ends_with_mains_exit_status(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "muse_torchrec.cli", "synth", "--out", str(tmp_path / "raw"),
                         "--scale", "0.01"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and any((tmp_path / "raw").iterdir())
    bad = subprocess.run([sys.executable, "-m", "muse_torchrec.cli", "plan", "--config", "no/such.yaml"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "error" in bad.stderr
