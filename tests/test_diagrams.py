"""The committed diagrams are generated from the declaration and not stale."""

from __future__ import annotations

from pathlib import Path

from kvroom.cli import main
from kvroom.fsm import Role
from kvroom.observe.diagrams import DEFAULT_DIR, render_mermaid, render_protocol, render_sequence
from kvroom.protocol import DECODE_TABLE, PREFILL_TABLE, Msg

README = Path(__file__).resolve().parent.parent / "README.md"


def test_committed_diagrams_are_current(capsys: object) -> None:
    assert main(["diagrams", "--check"]) == 0


def test_check_fails_on_stale_or_missing_files(tmp_path: Path) -> None:
    assert main(["diagrams", "--check", "--out", str(tmp_path)]) == 1
    assert main(["diagrams", "--out", str(tmp_path)]) == 0
    assert main(["diagrams", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "sender.mmd").write_text((tmp_path / "sender.mmd").read_text().replace("send", "sned"))
    assert main(["diagrams", "--check", "--out", str(tmp_path)]) == 1


def test_diagrams_show_every_declared_event() -> None:
    sender = render_mermaid(Role.SENDER)
    assert "Transferring --> Success: complete [all_chunks_done]" in sender
    assert "Bootstrapping --> Failed: abort | remote_abort | transport_error | peer_lost | timeout" in sender
    assert "metadata_sent" in render_mermaid(Role.RECEIVER)


def test_readme_shows_the_current_diagrams() -> None:
    text = README.read_text()
    for role in Role:
        assert (DEFAULT_DIR / f"{role.value}.mmd").read_text().strip() in text


def test_protocol_diagrams_draw_every_table_entry() -> None:
    decode = render_protocol("decode")
    for (phase, inp, sender), reaction in DECODE_TABLE.items():
        assert f"{phase.value} --> " in decode
        assert f": {inp.value} ({sender.value}) / {reaction.value}" in decode
    prefill = render_protocol("prefill")
    for (pphase, inp, coordinator), reaction in PREFILL_TABLE.items():
        who = "rank 0" if coordinator else "rank k"
        assert f"{pphase.value} --> " in prefill
        assert f": {inp.value} ({who}) / {reaction.value}" in prefill
    assert "Voted --> Success: COMMIT (coordinator)" in decode
    sequence = render_sequence()
    assert sequence.index(f"decode->>prefill0: {Msg.ROOM.name}") < sequence.index("READY")
    assert sequence.index("READY") < sequence.index(f"prefill0->>decode: {Msg.COMMIT.name}")
