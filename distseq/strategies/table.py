"""The capability table of every registered strategy, generated from the strategies themselves.

``python -m distseq.strategies.table`` prints it; ``--write docs/strategies.md`` puts it between
the markers ``<!-- capabilities:begin -->`` and ``<!-- capabilities:end -->``, and a test keeps
the page equal to the code.
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path

from distseq.strategies import REGISTRY_BY_MIXER


def _summary(method) -> str:
    """A method's docstring as one table cell (``-`` when the base class's is inherited)."""
    doc = inspect.getdoc(method) or "-"
    return " ".join(doc.split()).replace("|", "\\|")


def capability_table() -> str:
    """Markdown: one row per strategy (mixer, name, layouts, constraints, bytes per rank)."""
    rows = [
        "| mixer | strategy | layouts | constraint beyond the layout | bytes of the busiest rank |",
        "|---|---|---|---|---|",
    ]
    for mixer, registry in REGISTRY_BY_MIXER.items():
        for name in sorted(registry):
            strategy = registry.get(name)
            base = next(c for c in type(strategy).__mro__ if inspect.isabstract(c))
            own_check = type(strategy).check_group is not base.check_group
            check = _summary(strategy.check_group) if own_check else "-"
            layouts = ", ".join(strategy.layouts)
            traffic = _summary(strategy.traffic)
            rows.append(f"| {mixer} | `{name}` | {layouts} | {check} | {traffic} |")
    return "\n".join(rows) + "\n"


_MARKED = re.compile(r"(<!-- capabilities:begin -->\n).*?(<!-- capabilities:end -->)", re.S)


def embed(page: str) -> str:
    """``page`` (markdown) with the current table between its capability markers."""
    if not _MARKED.search(page):
        raise ValueError("no <!-- capabilities:begin --> ... <!-- capabilities:end --> markers")
    return _MARKED.sub(lambda m: m[1] + capability_table() + m[2], page)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PAGE", help="update the table inside this page")
    args = parser.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(embed(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(capability_table(), end="")


if __name__ == "__main__":
    main()
