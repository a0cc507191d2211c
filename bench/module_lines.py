"""Lines of agent_app.py by section, at other commits beside the working tree's (issue 13's line measure).

    .venv/bin/python bench/module_lines.py                     # the working tree alone
    .venv/bin/python bench/module_lines.py 3f8100e 52b478e     # and at those commits, for comparison

A section runs from its `# --- N. Title ---` banner to the next; what comes before the first banner (the
docstring map and the imports) is "head". Sections are matched by title, so renumbered ones line up.
"""

import argparse
import re
import subprocess
from pathlib import Path

MAIN_DIR = Path(__file__).resolve().parent.parent
BANNER = re.compile(r"^# --- \d+\. (?P<title>[^-]+?) ---$")


def sections(text: str) -> dict[str, int]:
    """Line counts by section title, in the file's order."""
    counts = {"head": 0}
    current = "head"
    for line in text.splitlines():
        if match := BANNER.match(line):
            current = match["title"]
            counts[current] = 0
        counts[current] += 1
    return counts


def source_at(revision: str | None) -> str:
    if revision is None:
        return (MAIN_DIR / "agent_app.py").read_text()
    return subprocess.run(["git", "show", f"{revision}:agent_app.py"], cwd=MAIN_DIR, check=True,
                          capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", help="commits to show beside the working tree")
    args = parser.parse_args()
    columns = [*args.revisions, "working tree"]
    counts = [sections(source_at(revision)) for revision in args.revisions] + [sections(source_at(None))]
    titles = list(dict.fromkeys(title for count in counts for title in count))
    width = max(map(len, titles)) + 2
    print(f"{'section':{width}}" + "".join(f"{column:>14}" for column in columns))
    for title in titles:
        print(f"{title:{width}}" + "".join(f"{count.get(title, 0):>14,}" for count in counts))
    print(f"{'total':{width}}" + "".join(f"{sum(count.values()):>14,}" for count in counts))


if __name__ == "__main__":
    main()
