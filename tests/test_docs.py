"""The docs stay true: generated tables match the schemas, codes are documented,
code samples compile and links resolve."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import get_args

import pytest
from docblocks import DOCS, ROOT, Block, python_blocks

from pmhub import _protocol_doc, protocol
from pmhub.errors import STATUS_BY_CODE, ErrorCode
from pmhub.frames import ClientFrame, ServerFrame

PROTOCOL_MD = ROOT / "docs" / "protocol.md"
REGENERATE = "python -m pmhub._protocol_doc --write docs/protocol.md"


def protocol_text() -> str:
    return PROTOCOL_MD.read_text(encoding="utf-8")


def hand_written(text: str) -> str:
    """The document without its generated sections."""
    for name in _protocol_doc.SECTIONS:
        text = re.sub(
            rf"<!-- generated:{name}:begin -->.*?<!-- generated:{name}:end -->",
            "",
            text,
            flags=re.DOTALL,
        )
    return text


def test_generated_sections_match_the_schemas() -> None:
    text = protocol_text()
    fresh = _protocol_doc.update(text)
    if fresh != text:
        diff = "".join(
            difflib.unified_diff(
                text.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                "docs/protocol.md",
                "rendered from the schemas",
            )
        )
        pytest.fail(f"docs/protocol.md is out of date; run `{REGENERATE}`\n{diff}")


def test_check_reports_a_stale_copy_and_write_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = protocol_text()
    stale = tmp_path / "protocol.md"
    stale.write_text(text.replace("| `sync_page_size` | `500` |", "| `sync_page_size` | `5` |"))
    assert _protocol_doc.main(["--check", str(stale)]) == 1
    report = capsys.readouterr().out
    assert "-| `sync_page_size` | `5` |" in report and "--write" in report
    assert _protocol_doc.main(["--write", str(stale)]) == 0
    assert stale.read_text() == text
    assert _protocol_doc.main(["--check", str(stale)]) == 0


def test_update_needs_the_markers() -> None:
    with pytest.raises(ValueError, match="generated:frames:begin"):
        _protocol_doc.update("# no markers here\n")


def test_every_frame_type_is_described_outside_the_generated_tables() -> None:
    # The generated tables give the fields; the prose must say what each frame does.
    text = hand_written(protocol_text())
    for union in (ClientFrame, ServerFrame):
        for struct in union.__args__:
            tag = struct.__struct_config__.tag
            assert f"| `{tag}` |" in text, f"docs/protocol.md has no table row for `{tag}`"


@pytest.mark.parametrize(("code", "status"), sorted(STATUS_BY_CODE.items()))
def test_every_error_code_is_documented_with_its_status(code: str, status: int) -> None:
    row = re.search(rf"^\| `{code}` \| (\d+) \|", protocol_text(), flags=re.MULTILINE)
    assert row, f"docs/protocol.md has no error table row for `{code}`"
    assert int(row.group(1)) == status, f"`{code}` is HTTP {status}, the docs say {row.group(1)}"


CLOSE_CODES = sorted(
    (name, getattr(protocol, name)) for name in protocol.__all__ if name.startswith("CLOSE_")
)


@pytest.mark.parametrize(("name", "code"), CLOSE_CODES)
def test_every_close_code_is_documented(name: str, code: int) -> None:
    text = hand_written(protocol_text())
    assert re.search(rf"^\| {code} \|", text, flags=re.MULTILINE), (
        f"docs/protocol.md has no close code row for {code} ({name})"
    )


def test_docs_have_python_blocks() -> None:
    # Guards the parser: if it found nothing, the compile test would pass vacuously.
    examples = {block.example for block in python_blocks()}
    assert {"starlette", "fastapi", "authenticator", "policy"} <= examples


@pytest.mark.parametrize("block", python_blocks(), ids=lambda block: block.where)
def test_python_block_compiles(block: Block) -> None:
    try:
        block.compile()
    except SyntaxError as exc:
        pytest.fail(f"{block.where}: the ```python block does not compile: {exc}")


LINK = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)")


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found: set[str] = set()
    for block_free in re.split(r"^```.*?^```", path.read_text(encoding="utf-8"), flags=re.M | re.S):
        for heading in re.findall(r"^#+ (.+)$", block_free, flags=re.MULTILINE):
            found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_between_docs_resolve(path: Path) -> None:
    for target, anchor in LINK.findall(path.read_text(encoding="utf-8")):
        if "://" in target or not (target.endswith(".md") or target == ""):
            continue
        linked = (path.parent / target) if target else path
        assert linked.is_file(), f"{path.name} links to missing {target}"
        if anchor:
            assert anchor in anchors(linked), f"{path.name} links to missing {target}#{anchor}"


def test_every_error_code_has_its_http_status() -> None:
    assert set(get_args(ErrorCode)) == set(STATUS_BY_CODE)
