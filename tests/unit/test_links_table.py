"""``bench/links.py``'s table logic on hand-made rounds: compute is a method's ``lan``
time, transfer the extra over it, the link bound follows the profile's rates, and the
straggler cost is the spread between the first and the last reply."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import links

MIB = 2**20


def _round(n: int, wall: float, replies: list[float], up: int = 4 * MIB) -> dict:
    return {"round": n, "wall_s": wall, "client_train_s": 50.0, "eval_s": 5.0,
            "accuracy": 0.1 * n, "fedpeft_bytes": up, "iface_bytes": up, "iface_up": up,
            "iface_down": 0, "reply_s": sorted(replies),
            "reply_by_partition": dict(enumerate(replies))}


def _run(profile: str, walls: list[float], replies: list[list[float]]) -> dict:
    rounds = [_round(i + 1, w, r) for i, (w, r) in enumerate(zip(walls, replies, strict=True))]
    return {"method": "lora", "profile": profile, "nodes": 4, "acc0": 0.0, "rounds": rounds}


def test_split_against_lan_and_the_straggler_spread() -> None:
    lan = _run("lan", [90.0, 60.0, 62.0], [[50, 51, 52, 52]] * 3)
    mixed = _run("mixed", [120.0, 100.0, 104.0], [[50, 55, 90, 96], [50, 56, 92, 98],
                                                   [51, 55, 93, 100]])
    lan_row, row = links.split([lan, mixed], target=0.25)
    assert lan_row["transfer_s"] == 0 and lan_row["straggler_s"] == pytest.approx(2.0)
    assert row["compute_s"] == pytest.approx(61.0)  # round 1 (start-up) left out
    assert row["transfer_s"] == pytest.approx(102.0 - 61.0)
    assert row["straggler_s"] == pytest.approx((98 + 100) / 2 - (50 + 51) / 2)
    # a phone node (1 Mbit/s up) moves its quarter of 4 MiB in 8.39 s; lan and edge are faster
    assert row["link_bound_s"] == pytest.approx(MIB * 8 / 1e6)
    assert row["rounds_to_target"] == 3 and row["seconds_to_target"] == pytest.approx(324.0)
    assert "50.5 → 99.0" in links.markdown([lan_row, row])
    # partitions 0..3 sit on lan, edge, phone, phone: the phones are the stragglers
    assert row["reply_by_link"] == pytest.approx({"lan": 50.5, "edge": 55.5, "phone": 95.75})
    text = links.straggler_markdown([lan_row, row])
    assert "| lora | mixed | lan | 50.5 | 48.5 |" in text and "| lora | lan |" not in text
    assert "| lora | mixed | 3 | 324.0 | 0.300 |" in links.target_markdown([row], 0.25)
    (missed,) = links.split([lan], target=0.5)
    assert "| lora | lan | not reached |  | 0.300 |" in links.target_markdown([missed], 0.5)


def test_runs_recorded_before_reply_times_leave_the_column_empty() -> None:
    old = _run("lan", [90.0, 60.0], [[], []])
    (row,) = links.split([old], target=None)
    assert row["straggler_s"] is None and "|  |" in links.markdown([row])
