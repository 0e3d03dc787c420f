"""The code's shape: no function longer than 80 lines (issue 17).

A long function is where closures pile up and names are used before they are bound (as
`run_bot` and `create_app` once were). ruff's PLR0915 and C901 (ruff.toml) count statements
and branches; this counts lines, the measure the project states, over every module of the
package, the benchmarks and the root scripts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 80


def project_sources() -> Iterator[Path]:
    """Every .py under phonebot/ and bench/, and the scripts at the top (server.py, bot.py, …)."""
    yield from sorted(ROOT.glob("*.py"))
    for package in ("phonebot", "bench"):
        yield from sorted((ROOT / package).rglob("*.py"))


def long_functions(path: Path, root: Path = ROOT) -> Iterator[str]:
    """`file:line name (N lines)` for each function or method in `path` longer than the
    limit, nested ones included; a function's lines run from its `def` to its last line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                where = path.relative_to(root).as_posix()
                yield f"{where}:{node.lineno} {node.name} ({lines} lines)"


def test_the_sources_are_found() -> None:
    names = {path.relative_to(ROOT).as_posix() for path in project_sources()}
    assert {"bot.py", "server.py", "dialout.py", "phonebot/config.py"} <= names
    assert any(name.startswith("bench/") for name in names)


def test_no_function_is_longer_than_80_lines() -> None:
    too_long = [entry for path in project_sources() for entry in long_functions(path)]
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def test_the_measure_counts_from_def_to_last_line(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "sample.py"
    source.write_text(f"def fits():\n{body[: body.rfind(chr(10))]}\n\ndef long():\n{body}\n")
    found = [entry.split(" ", 1)[1] for entry in long_functions(source, tmp_path)]
    assert found == [f"long ({MAX_FUNCTION_LINES + 1} lines)"]
