"""Running Python without site processing, so the editable install's import hook is absent and `import fastfit`
finds whatever the given folders hold (a wheel unpacked, a bare checkout, a modified copy); the environment's
packages (torch, triton, …) stay importable through PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def run_without_site(
    args: list[str], folders: list[Path], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`python -S *args` with `folders` first on PYTHONPATH, then the environment's site-packages (this one's, and
    any that a .pth file of it adds, e.g. a worktree environment that borrows another's packages)."""
    sites = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    path = os.pathsep.join([*map(str, folders), *dict.fromkeys(sites)])
    return subprocess.run(
        [sys.executable, "-S", *args],
        cwd=cwd,
        env={**os.environ, **(env or {}), "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
