"""The documents the code points to exist and say what is cited: every 'ALGORITHMS.md
section N' in the code, tests and docs names a section of docs/ALGORITHMS.md."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CITATION = re.compile(r'ALGORITHMS\.md,? \(?sections? (\d+(?:(?:, | and | or )\d+)*)')


def _sections() -> set[int]:
  text = (ROOT / 'docs' / 'ALGORITHMS.md').read_text()
  return {int(n) for n in re.findall(r'^## (\d+)\. ', text, flags=re.M)}


def _citations() -> list[tuple[str, int]]:
  files = [*ROOT.glob('bond_jax/**/*.py'), *ROOT.glob('tests/**/*.py'), *ROOT.glob('scripts/*.py')]
  files += [*ROOT.glob('benchmarks/*.py'), *ROOT.glob('configs/*.py'), *ROOT.glob('*.md')]
  files += [*ROOT.glob('docs/*.md')]
  found = []
  for path in files:
    for match in CITATION.finditer(path.read_text()):
      found += [(str(path.relative_to(ROOT)), int(n)) for n in re.findall(r'\d+', match.group(1))]
  return found


def test_every_cited_section_exists():
  sections, cited = _sections(), _citations()
  assert sections >= set(range(1, 11)), sorted(sections)
  assert len(cited) >= 8  # the check can fail: the code does cite sections
  missing = [(where, n) for where, n in cited if n not in sections]
  assert not missing, f'cited sections that docs/ALGORITHMS.md lacks: {missing}'


def test_the_pattern_finds_lists_of_sections():
  text = (
    'ALGORITHMS.md sections 4, 6 and 7; ALGORITHMS.md section 8, ALGORITHMS.md (sections 4, 6, 7)'
  )
  assert [m.group(1) for m in CITATION.finditer(text)] == ['4, 6 and 7', '8', '4, 6, 7']
