"""The project's database osfp/data/stepstone.fp: stock p0f.fp plus current signatures."""

from __future__ import annotations

from pathlib import Path

import pytest

from osfp import DatabaseLoadError, Fingerprinter, default_database_path, stock_database_path
from osfp.craft import VARIANTS, database_packets, write_pcap
from osfp.database import load
from osfp.reference import os_text, p0f_binary, run_p0f

STOCK = load(stock_database_path())
OURS = load(default_database_path())
ADDED_SYN = OURS.syn[len(STOCK.syn) :]
ADDED_SYNACK = OURS.synack[len(STOCK.synack) :]


def _meaningful(path: Path) -> list[str]:
    lines = path.read_text().replace("\r\n", "\n").splitlines()
    return [line for line in lines if line.strip() and not line.startswith(";")]


def test_stock_file_is_kept_whole_and_in_order() -> None:
    stock = _meaningful(stock_database_path())
    ours = iter(_meaningful(default_database_path()))
    missing = [line for line in stock if not any(line == mine for mine in ours)]
    assert not missing, missing[:5]
    # ... and the stock signatures come first in each section, in their order (p0f's priority).
    assert [s.raw for s in OURS.syn[: len(STOCK.syn)]] == [s.raw for s in STOCK.syn]
    assert [s.raw for s in OURS.synack[: len(STOCK.synack)]] == [s.raw for s in STOCK.synack]
    assert ADDED_SYN and ADDED_SYNACK


def test_every_addition_is_documented() -> None:
    """Each added label is preceded by a comment block saying where its values come from."""
    text = default_database_path().read_text()
    for label in {s.label for s in (*ADDED_SYN, *ADDED_SYNACK)}:
        at = text.index(f"label = s:{label}")
        before = text[:at].rstrip("\n").splitlines()
        assert before[-1].startswith(";"), label
        comment = []
        for line in reversed(before):
            if not line.startswith(";"):
                break
            comment.append(line)
        assert len(comment) >= 3, (label, comment)


def test_additions_are_specific_and_never_user_apps() -> None:
    for sig in (*ADDED_SYN, *ADDED_SYNACK):
        assert not sig.generic and not sig.user_app, sig.raw


@pytest.mark.parametrize("synack", [False, True], ids=["syn", "synack"])
def test_each_addition_labels_its_own_packets(synack: bool) -> None:
    """Crafted exactly, every new signature gets its own label: no earlier signature shadows it."""
    fp = Fingerprinter()
    added = ADDED_SYNACK if synack else ADDED_SYN
    packets = [c for c in database_packets(added, synack=synack) if c.variant != "flow-syn"]
    assert len(packets) >= len(added)
    for c in packets:
        result = fp.fingerprint(c.ip)
        assert (result.label, result.match, result.generic) == (c.sig.label, "exact", False), (
            c.sig.raw,
            result,
        )


@pytest.mark.parametrize("synack", [False, True], ids=["syn", "synack"])
def test_stock_labels_survive_the_additions(synack: bool) -> None:
    """Every stock signature, crafted exactly and pushed off, gets the same label from both databases
    unless the stock one was generic, fuzzy or absent (the point of the additions)."""
    ours, stock = Fingerprinter(), Fingerprinter(stock_database_path())
    sigs = STOCK.synack if synack else STOCK.syn
    changed = 0
    for c in database_packets(sigs, synack=synack, variants=VARIANTS):
        a, b = ours.fingerprint(c.ip), stock.fingerprint(c.ip)
        if b.match == "exact" and not b.generic:
            assert a == b, (c.sig.raw, c.variant, a, b)
        elif a != b:
            changed += 1
            assert a.match is not None and not a.generic
    assert changed > 0  # some generic/fuzzy/unknown stock results became specific


@pytest.mark.skipif(p0f_binary() is None, reason="needs Debian's p0f binary")
def test_p0f_reads_our_database_and_agrees(tmp_path: Path) -> None:
    """p0f itself loads stepstone.fp and labels every crafted packet (all signatures, all variants)
    as we do: the new signatures mean the same to both."""
    syn = database_packets(OURS.syn, synack=False, variants=VARIANTS)
    synack = database_packets(OURS.synack, synack=True, variants=VARIANTS, first=len(syn) + 1)
    packets = syn + synack
    pcap = tmp_path / "ours.pcap"
    write_pcap(pcap, ((1_700_000_000 + i / 1000, c.ip) for i, c in enumerate(packets)))
    fp = Fingerprinter()
    ours = {}
    for c in packets:
        r = fp.fingerprint(c.ip)
        ours.setdefault((c.key, r.sig), r)
    theirs = run_p0f(pcap, db=default_database_path())
    assert len(theirs) > 0.9 * len(packets)
    new_labels = {os_text(s.label) for s in (*ADDED_SYN, *ADDED_SYNACK)}
    seen_new = 0
    for e in theirs:
        mine = ours[(e.key, e.raw_sig)]
        assert os_text(mine.label) == e.os, (e, mine)
        seen_new += e.os in new_labels
    assert seen_new > 500


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatabaseLoadError, match=r"nowhere\.fp"):
        Fingerprinter(tmp_path / "nowhere.fp")
    broken = tmp_path / "broken.fp"
    broken.write_text("[tcp:request]\nlabel = s:unix:Linux:x\nsig = *:64:0:*:mss*10,*:mss:df:zz\n")
    with pytest.raises(DatabaseLoadError, match=r"broken\.fp"):
        Fingerprinter(broken)


def test_explain_names_the_matching_line() -> None:
    from osfp.craft import Shape, build

    where = Fingerprinter().explain(build(Shape()))
    assert where is not None
    path, line, text = where.split(":", 2)
    assert path == str(default_database_path())
    assert default_database_path().read_text().splitlines()[int(line) - 1].endswith(text.strip())
    assert "mss*44" in text
