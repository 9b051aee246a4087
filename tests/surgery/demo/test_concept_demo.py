"""``surgery demo``: the mean over pairs the protocol draws, each pair's rows, and the figure of pair 1."""

from __future__ import annotations

import re

import pytest

from surgery.cli.main import main
from surgery.demo.concept import Unit, run_concept_demo, summary_table
from surgery.edits.edit import Edit
from surgery.errors import SurgeryError


def unit(pair: int, edit: tuple, finetune: tuple, clean: tuple = (-0.1, 0.0), draw: int = 1) -> Unit:
    keys = ("target/seen", "others/seen", "others/held out")
    return Unit(pair, draw, f"style{pair} on the concept{pair} (class{pair})",
                {"edit": dict(zip(keys, edit)), "fine-tune": dict(zip(keys, finetune))},
                {"edit": clean[0], "fine-tune": clean[1]}, {"edit": object(), "fine-tune": None})


def test_summary_shows_every_pair_and_their_mean():
    units = [unit(1, (60, 30, 10), (20, 0, 0)), unit(2, (40, None, 20), (10, 5, -5)), unit(3, (50, 12, 0), (30, -6, 2))]
    table = summary_table(units)
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 * 3 + 2  # edit and fine-tuning for each pair, then their means
    assert rows[0].startswith("| 1. style1 on the concept1 (class1) | edit | +60% | +30% | +10% | -0.10 |")
    assert rows[1] == "|  | fine-tune (none within budget) | +20% | +0% | +0% | +0.00 |"
    assert rows[2].startswith("| 2. style2 on the concept2 (class2) | edit | +40% | n/a | +20% |")
    # means skip the cells without errors to correct: others/seen of the edit is (30 + 12) / 2
    assert rows[6] == "| **mean of 3 pairs** | edit | **+50%** | **+21%** | **+10%** | -0.10 |"
    assert rows[7] == "|  | fine-tune | **+20%** | **-0%** | **-1%** | +0.00 |"
    # the lead is paired per unit, where both methods have a number
    assert "lead over fine-tuning on other classes' errors (seen variant): +24 points, the mean of 3 (+30, n/a, +18)" in table
    assert "one draw per pair" in table


def test_summary_with_several_draws_names_them():
    table = summary_table([unit(1, (1, 2, 3), (0, 0, 0), draw=1), unit(1, (3, 4, 5), (0, 0, 0), draw=2)])
    assert "| 1. style1 on the concept1 (class1), draw 2 | edit |" in table
    assert "**mean of 2 units (1 pairs)**" in table and "2 draws per pair" in table


def test_needs_a_pair_and_a_draw(capsys):
    with pytest.raises(SurgeryError, match="at least one pair"):
        run_concept_demo(pairs=0)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--draws", "0"])
    assert e.value.code == 2 and "--draws: must be positive" in capsys.readouterr().err


def test_tiny_demo_reports_the_pairs_the_protocol_draws(tmp_path, monkeypatch, capsys):
    """End to end on few scenes: the pairs come from surgery.testbed.protocol.select_pairs, in its order;
    each pair has its rows, the mean follows, and the figure and the edit are pair 1's."""
    import surgery.testbed.protocol as protocol

    drawn = []
    select_pairs = protocol.select_pairs

    def recording(*args, **kwargs):
        pairs, screened = select_pairs(*args, **kwargs)
        drawn.extend(pairs)
        return pairs, screened

    monkeypatch.setattr(protocol, "select_pairs", recording)
    assert run_concept_demo(out_dir=tmp_path, pairs=3, scenes=(150, 250, 300), ft_steps=3) == 0
    out = capsys.readouterr().out
    assert len(drawn) == 3
    labels = [f"{p['style']} on the {p['concept']}" for p in drawn]
    for i, label in enumerate(labels, 1):
        assert re.search(rf"^\| {i}\. {re.escape(label)} \(.+\) \| edit \|", out, re.M), (label, out)
    assert re.search(r"^\| \*\*mean of 3 pairs\*\* \| edit \| ", out, re.M)
    assert re.search(r"^\|  \| fine-tune \| \*\*", out, re.M)
    assert "Edit's lead over fine-tuning" in out
    report = (tmp_path / "demo.md").read_text()
    assert "mean of 3 pairs" in report and f"shows test scenes of pair 1, draw 1: {labels[0]}" in report
    assert (tmp_path / "demo.png").stat().st_size > 0
    edit_file = tmp_path / "demo-edit.safetensors"
    if edit_file.exists():  # pair 1 may have had no edit within the budget
        assert Edit.load(edit_file).description.startswith(f"testbed VGG, pair 1: {labels[0]}")
