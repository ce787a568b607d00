"""Lines and longest function of every module under a package folder, as Markdown rows (for refactoring notes).

python scripts/module_sizes.py accel_nvme
"""

import ast
import pathlib
import sys


def main(root: pathlib.Path) -> None:
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        longest = max(functions, key=lambda n: n.end_lineno - n.lineno, default=None)
        name, length = (longest.name, longest.end_lineno - longest.lineno + 1) if longest else ("-", 0)
        print(f"| {path.relative_to(root.parent)} | {len(source.splitlines())} | `{name}` ({length}) |")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))
