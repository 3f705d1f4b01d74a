"""``report.common``: figure file names from split and class names."""

from __future__ import annotations

from vog_ray.report.common import safe_name


def test_safe_names_never_collide_and_keep_plain_names():
    names = ["a b", "a_b", "a/b", "a\\b", "ä_b", "train", "test-1.v2", "", "..", "<script>"]
    got = [safe_name(n) for n in names]
    assert len(set(got)) == len(got), got
    assert safe_name("train") == "train" and safe_name("test-1.v2") == "test-1.v2" and safe_name("a_b") == "a_b"
    assert all(set(g) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-") for g in got)
    assert safe_name("a b") == safe_name("a b")  # stable: a report rewritten names its figures the same
