"""README and docs/: a short README, and no relative link to a file that is not there."""

import re
from pathlib import Path

from service.config import Settings
from tests.support import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
README_MAX_LINES = 300
# [text](target), target up to a space (a title) or the closing parenthesis.
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)")


def pages() -> list[Path]:
    return [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]


def relative_links(page: Path) -> list[str]:
    """The links to files of the checkout: no web address, no anchor within the page."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    targets = LINK.findall(text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t, re.IGNORECASE)]


def test_every_relative_link_resolves_to_a_file() -> None:
    assert len(pages()) > 1, "no docs/ pages found"
    broken = [
        f"{page.relative_to(PROJECT_ROOT)}: {target}"
        for page in pages()
        for target in relative_links(page)
        if not (page.parent / target.partition("#")[0]).exists()
    ]
    assert not broken, broken


def test_the_readme_stays_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_readme_links_every_docs_page() -> None:
    linked = {(PROJECT_ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    unlinked = [str(page.relative_to(PROJECT_ROOT)) for page in pages()[1:] if page not in linked]
    assert not unlinked, f"README's Documentation section misses {unlinked}"


def test_the_configuration_page_lists_every_setting() -> None:
    table = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    listed = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.MULTILINE))
    assert "DATABASE_URL" in listed  # the table was read
    missing = sorted(name.upper() for name in Settings.model_fields if name.upper() not in listed)
    assert not missing, f"docs/configuration.md does not list {missing}"
