"""The repository's own docs are what its files cite: docs/method.md defines the method, every
"docs/method.md, <Section>" citation names one of its headings, and no file points at a document a user of
the repository does not have (bench/RESULTS.md keeps its dated history as written)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not names:  # a copy without .git: every file under the root
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [ROOT / n for n in names if Path(n).suffix in (".py", ".md", ".yaml", ".sh", ".json", ".txt")]


def test_citations_of_the_method_name_its_sections():
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,3} (.+)$", (ROOT / "docs" / "method.md").read_text(),
                                                         re.M)}
    cited = {}
    for path in _tracked_text_files():
        for section in re.findall(r"docs/method\.md, ([A-Z][a-z]+(?: [a-z]+)?)", path.read_text(errors="replace")):
            cited.setdefault(section, path.name)
    assert cited and {"Losses", "Stability", "Defaults"} <= set(cited)
    missing = {s: f for s, f in cited.items() if s not in headings and s.split()[0] not in headings}
    assert not missing, f"cited sections without a heading in docs/method.md: {missing}"


def test_no_file_points_outside_the_repository():
    outside = [str(p.relative_to(ROOT)) for p in _tracked_text_files()
               if p.name != "RESULTS.md" and "HCD_" + "SPEC" in p.read_text(errors="replace")]
    assert outside == []
