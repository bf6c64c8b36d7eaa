"""The project carries the facts it cites: every docs/reference.md anchor the code or docs name exists, and nothing
cites a reference file outside the repository."""

import re
import subprocess

from pretrain_support import REPO

OUTSIDE = "REFERENCE" + ".md"  # the notes file that lives outside the repository


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".sh", ".sbatch", ".toml", ".json", ".txt"} and path.is_file():
            yield path


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_reference_anchor_resolves_and_nothing_cites_outside_the_repo():
    known = anchors((REPO / "docs" / "reference.md").read_text())
    cited, outside = {}, []
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        if OUTSIDE in text:
            outside.append(str(path.relative_to(REPO)))
        for anchor in re.findall(r"reference\.md#([\w-]+)", text):
            cited.setdefault(anchor, str(path.relative_to(REPO)))
    assert outside == []
    assert len(cited) >= 5 and {a: f for a, f in cited.items() if a not in known} == {}
