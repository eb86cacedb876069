"""The documentation points at things that exist: relative links resolve to files (and their
#anchors to headings), and every repository path it names, gin files included, is there.
These fail when a file, folder or heading moves and the pages were not updated."""

import itertools
import re
from pathlib import Path

import pytest

from benchmarks import check_figures

REPO = Path(__file__).resolve().parent.parent
PAGES = check_figures.pages()  # README.md, benchmarks/README.md, docs/*.md

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path into the repository: starts at a top-level folder, plain characters, brace lists
# ({a,b}) and globs (*) allowed; placeholders such as <name> end it and keep it unchecked.
REPO_PATH = re.compile(r"(?<![\w./\-<>$~])((?:gin|mm1_jax|tasks|tests|tpu_scripts|benchmarks|docs)/"
                       r"[\w./\-{},*]*)")


def _prose(text: str) -> str:
  """The text outside fenced code blocks, with inline code spans removed."""
  lines, in_code = [], False
  for line in text.splitlines():
    if line.strip().startswith("```"):
      in_code = not in_code
      continue
    if not in_code:
      lines.append(re.sub(r"`[^`]*`", "", line))
  return "\n".join(lines)


def links(text: str) -> list[str]:
  return LINK.findall(_prose(text))


def anchors(text: str) -> set[str]:
  """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -N on repeats."""
  out, seen, in_code = set(), {}, False
  for line in text.splitlines():
    if line.strip().startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
      slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def _expand(path: str) -> list[str]:
  """`aim_{600m,1b}.gin` -> `aim_600m.gin`, `aim_1b.gin`."""
  parts = re.split(r"\{([^{}]*)\}", path)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


def repo_paths(text: str) -> list[str]:
  """Repository paths named anywhere in the text, code blocks included (commands name gin
  files there), with trailing sentence punctuation removed; not a command's output
  (`--json_out=benchmarks/results/NAME.json`), which need not exist yet."""
  return [m.group(1).rstrip(".,;:") for m in REPO_PATH.finditer(text)
          if not text[:m.start()].endswith("out=")]


def _name(path: Path) -> str:
  return path.relative_to(REPO).as_posix() if REPO in path.parents else path.name


def link_problems(page: Path) -> list[str]:
  problems = []
  text = page.read_text()
  for target in links(text):
    if re.match(r"[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto:
      continue
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    if not dest.exists():
      problems.append(f"{_name(page)}: link ({target}) points to a missing file")
    elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
      problems.append(f"{_name(page)}: link ({target}) names no heading of {_name(dest)}")
  return problems


def path_problems(page: Path) -> list[str]:
  problems = []
  for path in repo_paths(page.read_text()):
    for p in _expand(path):
      if not (list(REPO.glob(p)) if "*" in p else (REPO / p).exists()):
        problems.append(f"{_name(page)}: names {p}, which does not exist")
  return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
  """Catches a link to a file or heading that moved or was renamed."""
  problems = link_problems(page)
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_repository_paths_exist(page):
  """Catches a gin file, module, test or folder named in the text that no longer exists."""
  problems = path_problems(page)
  assert not problems, "\n".join(problems)


def test_every_docs_page_is_linked_from_the_readme():
  """Catches a docs/ page nobody can find from the landing page."""
  linked = {(REPO / t.partition("#")[0]).resolve() for t in links((REPO / "README.md").read_text())}
  orphans = [p.name for p in (REPO / "docs").glob("*.md") if p.resolve() not in linked]
  assert not orphans, orphans


def test_the_checks_catch_broken_links_and_paths(tmp_path):
  """Catches checks that pass everything: a missing file, a missing heading, a missing gin
  file (also inside a brace list and in a code block) and a glob matching nothing are each
  reported; links out of the repository, placeholders and code spans are left alone."""
  (tmp_path / "other.md").write_text("# Other\n\n## Its part\n")
  page = tmp_path / "page.md"
  page.write_text(
      "# A page\n\n## Second heading: `code`\n\n"
      "[ok](#second-heading-code) [web](https://example.com/x) [there](other.md#its-part) "
      "[gone](missing.md) [no heading](#nowhere) [not there](other.md#nowhere) "
      "`[code](not_a_link.md)`\n\n"
      "Models `gin/models/mm1_tiny.gin`, `gin/models/mm1_{3b,4b}.gin`, "
      "`gin/pods/zz*.gin`, `gin/pods/mm1_*.gin`, `tests/golden/sharding/<preset>.<mesh>.txt`.\n\n"
      "```bash\nmm1-train --gin_file=gin/runs/nothing_here.gin --json_out=benchmarks/new.json\n```\n")
  assert link_problems(page) == [
      "page.md: link (missing.md) points to a missing file",
      "page.md: link (#nowhere) names no heading of page.md",
      "page.md: link (other.md#nowhere) names no heading of other.md"]
  assert path_problems(page) == [
      f"page.md: names {p}, which does not exist"
      for p in ("gin/models/mm1_4b.gin", "gin/pods/zz*.gin", "gin/runs/nothing_here.gin")]
