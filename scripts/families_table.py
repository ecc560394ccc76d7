"""The README's table of model families, generated from the parity tests.

    python scripts/families_table.py            # runs tests/stage/test_families.py, prints it
    python scripts/families_table.py --write    # and puts it in README.md between its markers

A family is "split exact" only when its parity test passed in this run; refused families come
from ``mesh.model.families.REFUSED`` with their reasons.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- families: begin -->", "<!-- families: end -->"


def _outcomes() -> dict[str, str]:
    """Family id -> "passed" or "failed", from a pytest run of the parity tests."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/stage/test_families.py",
                        "-k", "test_family_splits_match_single_context",
                        f"--junitxml={report}"], cwd=ROOT, check=False)
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            if "[" not in name:
                continue
            failed = any(child.tag in ("failure", "error", "skipped") for child in case)
            outcomes[name[name.index("[") + 1:-1]] = "failed" if failed else "passed"
        return outcomes


def table() -> str:
    sys.path.insert(0, str(ROOT))
    from mesh.model.families import REFUSED
    from tests.support.tiny import family_modules

    outcomes = _outcomes()
    rows = ["| family (llama.cpp arch) | status | cuts proven exact (stages) |", "|---|---|---|"]
    seen: dict[str, list[str]] = {}
    for module in family_modules():
        ok = outcomes.get(module.__name__.rsplit(".", 1)[1]) == "passed"
        cuts = ", ".join(f"{len(c) + 1}@{'/'.join(map(str, c))}" for c in module.CUTS)
        seen.setdefault(module.ARCH, []).append(cuts if ok else "parity test failing")
    for arch, cuts in sorted(seen.items()):
        ok = all("failing" not in c for c in cuts)
        rows.append(f"| `{arch}` | {'split exact' if ok else 'NOT proven'} | "
                    f"{'; '.join(cuts)} |")
    for arch, reason in sorted(REFUSED.items()):
        rows.append(f"| `{arch}` | refused | {reason} |")
    return "\n".join(rows)


@click.command()
@click.option("--write", is_flag=True, help="Replace the table in README.md.")
def main(write: bool) -> None:
    text = table()
    print(text)
    if write:
        readme = ROOT / "README.md"
        body = readme.read_text()
        head, _, rest = body.partition(BEGIN)
        _, _, tail = rest.partition(END)
        readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
