"""Start `make lab` headless, list the notebooks through JupyterLab's REST API, stop it.

    python scripts/check_lab.py      # prints the notebooks the server serves; exit 1 on failure
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_notebooks(timeout: float = 90.0) -> list[str]:
    """Names of the .ipynb files that a `make lab` server lists at its root."""
    port, token = free_port(), secrets.token_hex(16)
    flags = f"--no-browser --ip=127.0.0.1 --port={port} --IdentityProvider.token={token}"
    command = ["make", "-s", "lab", f"VENV={sys.prefix}", f"LAB_FLAGS={flags}"]
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/contents?token={token}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"`make lab` exited with {proc.returncode}:\n{proc.stdout.read().decode()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    listing = json.load(r)
                return sorted(item["name"] for item in listing["content"] if item["name"].endswith(".ipynb"))
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer on port {port} within {timeout:.0f} s")
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """End `make` and the server it started (they share a process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    names = served_notebooks()
    print("\n".join(names))
    sys.exit(0 if names else 1)
