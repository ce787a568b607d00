"""The README's main command, as written there, in a fresh venv: exit 0, every computed output exact, a PNG written.

    python3 scripts/readme_bench.py [--full]

Run from the repository root (CI runs it). It takes the first command of the README's "The two commands" block,
makes its venv ``.venv-bench`` (removed first: fresh) instead of ``.venv``, adds ``--quick`` (unless ``--full``) and
``--json``, runs it with bash and exits 1, saying why, unless the command exits 0, every mode ran, every output it
compares is ``torch.equal`` to the in-RAM model, and ``accel-nvme-bench.png`` was written in the current folder.
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV = ".venv-bench"
PLOT = Path("accel-nvme-bench.png")


def readme_main_command(readme: Path) -> str:
    """The README's main command: the line of its first bash block that ends with ``accel-nvme bench``."""
    block = re.search(r"```bash\n(.*?)```", readme.read_text(), re.S)
    lines = [
        line for line in (block.group(1) if block else "").splitlines() if line.rstrip().endswith("accel-nvme bench")
    ]
    if not lines:
        raise SystemExit(f"{readme}: no line ending with 'accel-nvme bench' in its first ```bash block")
    return lines[0].strip()


def ci_command(command: str, json_path: Path, full: bool) -> str:
    """``command`` with its venv at ``VENV`` and the bench's options added."""
    command = command.replace(".venv", VENV)
    return f"{command}{'' if full else ' --quick'} --json {json_path}"


def problems(report: dict) -> list[str]:
    """What is wrong in a bench report: a mode that did not run, or an output that is not exact."""
    found = []
    for mode in report["modes"]:
        if mode["status"] not in ("ok", "does not fit"):
            found.append(f"{mode['mode']}: {mode['status']}: {mode.get('error')}")
        for batch in mode.get("batches", []):
            if batch["exact"] is False:
                found.append(f"{mode['mode']} batch {batch['batch']}: not exact (max diff {batch['max_abs_diff']})")
    if not any(b["exact"] for m in report["modes"] for b in m.get("batches", [])):
        found.append("no output was compared with the in-RAM model")
    return found


def main() -> int:
    full = "--full" in sys.argv[1:]
    json_path = Path(tempfile.mkdtemp(prefix="readme-bench-")) / "report.json"
    command = ci_command(readme_main_command(Path("README.md")), json_path, full)
    shutil.rmtree(VENV, ignore_errors=True)
    PLOT.unlink(missing_ok=True)
    print(f"+ {command}", flush=True)
    start = time.monotonic()
    returncode = subprocess.run(["bash", "-c", command]).returncode
    print(
        f"the README's main command{'' if full else ' (--quick)'}: exit {returncode}, {time.monotonic() - start:.0f} s"
    )
    found = [f"exit status {returncode}"] if returncode else []
    found += problems(json.loads(json_path.read_text())) if json_path.exists() else ["no JSON report written"]
    if not PLOT.is_file() or PLOT.stat().st_size == 0:
        found.append(f"no {PLOT} written in {Path.cwd()}")
    shutil.rmtree(json_path.parent, ignore_errors=True)
    for problem in found:
        print(f"readme_bench: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
