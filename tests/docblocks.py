"""The fenced code blocks of README.md and docs/*.md, for the tests that keep the docs true.

Convention: every ```python block must compile. A block whose first line is
``# example: NAME`` is a complete module that a test runs (:func:`load_example`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, ModuleType

__all__ = ["DOCS", "ROOT", "Block", "code_blocks", "load_example", "python_blocks"]

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_EXAMPLE = re.compile(r"#\s*example:\s*(\S+)")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language and its code."""

    path: Path
    line: int  # 1-based line of the block's first code line
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def example(self) -> str | None:
        """NAME when the block starts with ``# example: NAME``."""
        match = _EXAMPLE.fullmatch(self.code.split("\n", 1)[0].strip())
        return match.group(1) if match else None

    def compile(self) -> CodeType:
        """Compile the code with line numbers that point into the Markdown file."""
        padded = "\n" * (self.line - 1) + self.code
        return compile(padded, str(self.path), "exec", dont_inherit=True)


def code_blocks(path: Path) -> list[Block]:
    """Every top-level fenced block of a Markdown file, in order."""
    blocks: list[Block] = []
    language: str | None = None
    start, lines = 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if language is None:
            if line.startswith("```"):
                language, start, lines = line[3:].strip(), number + 1, []
        elif line.startswith("```"):
            blocks.append(Block(path, start, language, "\n".join(lines) + "\n"))
            language = None
        else:
            lines.append(line)
    if language is not None:
        raise AssertionError(f"{path.relative_to(ROOT)}:{start - 1}: unclosed code block")
    return blocks


def python_blocks() -> list[Block]:
    """Every ```python block of README.md and docs/*.md."""
    return [block for path in DOCS for block in code_blocks(path) if block.language == "python"]


def load_example(name: str) -> ModuleType:
    """Run the block marked ``# example: NAME`` as a fresh module and return it."""
    found = [block for block in python_blocks() if block.example == name]
    if len(found) != 1:
        raise AssertionError(f"expected one `# example: {name}` block in the docs, found {found}")
    module = ModuleType(f"doc_example_{name}")
    module.__file__ = str(found[0].path)
    sys.modules[module.__name__] = module  # frameworks resolve annotations through it
    exec(found[0].compile(), module.__dict__)
    return module
