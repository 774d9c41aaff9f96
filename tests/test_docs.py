"""The docs read the code: the capability table in docs/strategies.md is the generated one."""

from __future__ import annotations

from pathlib import Path

import pytest

from distseq.strategies.table import capability_table, embed

PAGE = Path(__file__).resolve().parents[1] / "docs" / "strategies.md"


def test_strategies_page_shows_the_current_capabilities():
    page = PAGE.read_text(encoding="utf-8")
    assert capability_table() in page
    assert embed(page) == page, "run: python -m distseq.strategies.table --write docs/strategies.md"


def test_table_has_a_row_per_registered_strategy():
    from distseq.strategies import REGISTRY_BY_MIXER

    rows = [line for line in capability_table().splitlines() if line.startswith("| ")][1:]
    names = [(row.split("|")[1].strip(), row.split("|")[2].strip(" `")) for row in rows]
    assert names == [(m, n) for m, reg in REGISTRY_BY_MIXER.items() for n in sorted(reg)]
    ulysses = next(r for r in rows if "`ulysses`" in r)
    assert "divisible by" in ulysses


def test_embed_needs_the_markers():
    with pytest.raises(ValueError, match="markers"):
        embed("# no table here\n")
