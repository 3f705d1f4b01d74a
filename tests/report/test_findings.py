"""The findings a report opens with, built from hand-written ``report.json`` dicts: the sentences,
their numbers and keys, and which results do (not) reproduce the paper's direction."""

from __future__ import annotations

from vog_ray.report.findings import findings, findings_lines, window_stage

SUMMARY = {"primary": "late_softmax", "num_checkpoints": 55,
           "windows": {"early": [0, 1, 2], "mid": [20, 21, 22], "late": [52, 53, 54], "all": list(range(55))}}


def _flag(t, p, share, base=0.2):
    return {"t": t, "p": p, "top_decile_share": share, "base_rate": base, "mean_flagged": 0.0, "mean_rest": 0.0}


def _dec(rate, lo, hi):
    return {"error_rate": rate, "ci_low": lo, "ci_high": hi}


def _deciles(bottom, top):
    return [bottom] + [_dec(0.1, 0.05, 0.15)] * 8 + [top]


def _ood_row(auroc, aupr_out=0.5, paper=0.4):
    return {"auroc": auroc, "aupr_out": aupr_out, "aupr_out_paper": paper}


def _summ(mean, std):
    return {"mean": mean, "std": std, "n": 3}


REPORT = {
    "summary": SUMMARY,
    "flags": {"is_noisy": {"train": {
        "late_softmax": _flag(11.3, 6.5e-28, 0.54),
        "late_logit": _flag(-1.6, 0.12, 0.18),
        "early_softmax": _flag(-40.8, 4e-138, 0.01),
        "early_logit": _flag(2.5, 0.01, 0.26),
        "mid_softmax": _flag(3.0, 0.003, 0.3),
    }}},
    "error_by_vog": {
        "test": {"keys": {
            "late_softmax": {"deciles": _deciles(_dec(0.04, 0.01, 0.08), _dec(0.54, 0.44, 0.64))},
            "late_logit": {"deciles": _deciles(_dec(0.08, 0.03, 0.13), _dec(0.10, 0.05, 0.16))},
            "early_softmax": {"deciles": _deciles(_dec(0.3, 0.2, 0.4), _dec(0.01, 0.0, 0.03))},
        }},
        "unlabelled": {"keys": {}, "note": "no labels"},
    },
    "ood": {
        "in_distribution": "test", "group_names": ["brightness", "fog", "scale"],
        "summary": {"vog_late_softmax": {"auroc": _summ(0.38, 0.36), "aupr_out": _summ(0.45, 0.1),
                                         "aupr_out_paper": _summ(0.61, 0.2)},
                    "max_softmax": {"auroc": _summ(0.69, 0.11)},
                    "z_vs_test_late_softmax": {"auroc": _summ(0.41, 0.3)},
                    "abs_z_vs_test_late_softmax": {"auroc": _summ(0.77, 0.05)}},
        "groups": {"brightness": {"vog_late_softmax": _ood_row(0.17), "abs_z_vs_test_late_softmax": _ood_row(0.74)},
                   "fog": {"vog_late_softmax": _ood_row(0.18), "abs_z_vs_test_late_softmax": _ood_row(0.81)},
                   "scale": {"vog_late_softmax": _ood_row(0.80), "abs_z_vs_test_late_softmax": _ood_row(0.76)}},
    },
    "signals": {"flags": {"is_noisy": {"train": {"n": 100, "n_positive": 20, "resamples": 100, "table": [
        {"signal": "loss_mean", "place": 1, "auroc": 0.97, "auroc_ci": [0.95, 0.99], "aupr": 0.9,
         "aupr_base_rate": 0.2},
        {"signal": "aum", "place": 2, "auroc": 0.95, "auroc_ci": [0.93, 0.97], "aupr": 0.8, "aupr_base_rate": 0.2},
        {"signal": "z_late_softmax", "place": 3, "auroc": 0.85, "auroc_ci": [0.8, 0.9], "aupr": 0.6,
         "aupr_base_rate": 0.2},
    ]}}}},
}


def _by_key(items):
    return {f["key"]: f for f in items}


def test_window_stages():
    assert [window_stage(REPORT, w) for w in ("early", "mid", "late", "all")] == ["early", None, "late", "late"]


def test_flag_sentences_and_the_paper_direction():
    got = _by_key(findings(REPORT))
    f = got["flags.is_noisy.train.late_softmax"]
    assert f["text"] == ("is_noisy rows in train have higher late_softmax z-VoG than the rest (Welch t = 11.3, "
                         "p = 6.5e-28); they are 54% of the top decile against a 20% base rate, as the paper "
                         "finds late in training.")
    assert f["reproduces"] is True
    f = got["flags.is_noisy.train.late_logit"]
    assert f["text"] == ("is_noisy rows in train are not separated from the rest by late_logit z-VoG (Welch t = "
                         "-1.6, p = 0.12; 18% of the top decile against a 20% base rate); the paper finds higher "
                         "VoG for them late in training, so this does not reproduce its direction.")
    assert f["reproduces"] is False
    # the early window flips: lower VoG for flagged rows reproduces the paper, higher does not
    assert got["flags.is_noisy.train.early_softmax"]["reproduces"] is True
    assert "have lower early_softmax z-VoG" in got["flags.is_noisy.train.early_softmax"]["text"]
    assert got["flags.is_noisy.train.early_logit"]["reproduces"] is False
    assert "the paper finds lower VoG for them early" in got["flags.is_noisy.train.early_logit"]["text"]
    # a window in the middle carries no expectation
    assert got["flags.is_noisy.train.mid_softmax"]["reproduces"] is None
    assert got["flags.is_noisy.train.mid_softmax"]["text"].endswith("base rate.")


def test_error_sentences_only_for_the_ranked_window():
    got = _by_key(findings(REPORT))
    f = got["error_by_vog.test.keys.late_softmax.deciles"]
    assert f["text"] == ("In test, the top decile of late_softmax z-VoG has an error of 0.54 [0.44, 0.64] against "
                         "0.04 [0.01, 0.08] in the bottom decile: high VoG marks the errors, as in the paper (Fig. 4).")
    assert f["reproduces"] is True and f["value"] == 0.54
    f = got["error_by_vog.test.keys.late_logit.deciles"]
    assert "(95% intervals overlap: not separated)" in f["text"] and f["reproduces"] is False
    assert "error_by_vog.test.keys.early_softmax.deciles" not in got          # not the ranked window
    assert not [k for k in got if k.startswith("error_by_vog.unlabelled")]


def test_ood_sentences_name_the_groups_that_do_not_reproduce():
    got = _by_key(findings(REPORT))
    f = got["ood.summary.vog_late_softmax.auroc"]
    assert f["text"] == ("Across 3 OoD groups (each against test), raw late_softmax VoG has a mean AUROC of "
                         "0.38 ± 0.36, max-softmax 0.69 ± 0.11, so on average OoD does not have the higher VoG "
                         "the paper reports (Table 1).")
    assert f["reproduces"] is False
    f = got["ood.groups.{brightness,fog}.vog_late_softmax.auroc"]
    assert f["text"] == ("On brightness, fog, OoD images have lower raw late_softmax VoG than test (AUROC 0.17, "
                         "0.18): the paper's direction (higher VoG = OoD) does not hold there; the two-sided "
                         "abs_z_vs_test_late_softmax gives 0.74, 0.81.")
    assert f["reproduces"] is False and f["value"] == [0.17, 0.18]
    f = got["ood.summary.z_vs_test_late_softmax.auroc"]
    assert "z against test (z_vs_test_late_softmax) 0.41 ± 0.30" in f["text"]
    assert "|z| against test (abs_z_vs_test_late_softmax) 0.77 ± 0.05" in f["text"]
    f = got["ood.summary.vog_late_softmax.aupr_out_paper"]
    assert "mean AUPR-Out of 0.61, against 0.45 with this report's orientation" in f["text"]


def test_ood_groups_judged_by_their_bootstrap_intervals():
    """With league intervals: below 0.5 is lower VoG, an interval holding 0.5 is not separated
    (neither reproduces the paper), above 0.5 is the paper's direction (no sentence)."""
    def table(auroc, ci):
        return {"table": [{"signal": "vog_late_softmax", "auroc": auroc, "auroc_ci": ci}]}

    rep = {**REPORT, "signals": {"ood": {"groups": {"brightness": table(0.17, [0.1, 0.25]),
                                                    "fog": table(0.49, [0.42, 0.56]),
                                                    "scale": table(0.8, [0.7, 0.9])}}}}
    rep["ood"] = {**REPORT["ood"], "groups": {**REPORT["ood"]["groups"],
                                              "fog": {"vog_late_softmax": _ood_row(0.49),
                                                      "abs_z_vs_test_late_softmax": _ood_row(0.81)}}}
    got = _by_key(findings(rep))
    f = got["ood.groups.{brightness}.vog_late_softmax.auroc"]
    assert f["text"].startswith("On brightness, OoD images have lower raw late_softmax VoG than test (AUROC "
                                "0.17 [0.10, 0.25])") and f["reproduces"] is False
    f = got["ood.groups.{fog}.vog_late_softmax.auroc"]
    assert f["text"] == ("On fog, raw late_softmax VoG does not separate OoD images from test (AUROC 0.49 "
                         "[0.42, 0.56], intervals holding 0.5): the paper's direction is not seen there; the "
                         "two-sided abs_z_vs_test_late_softmax gives 0.81.")
    assert f["reproduces"] is False
    assert not [k for k in got if "scale" in k]


def test_league_sentence_gives_the_best_signal_and_vogs_place():
    f = _by_key(findings(REPORT))["signals.flags.is_noisy.train"]
    assert f["text"] == ("The best signal for finding is_noisy rows in train is loss_mean (AUROC 0.97 [0.95, 0.99], "
                         "AUPR 0.90 against a base rate of 0.20); the best VoG score, z_late_softmax, is number 3 "
                         "of 3 at AUROC 0.85 [0.80, 0.90].")


def test_lines_mark_what_does_not_reproduce_and_a_bare_report_has_none():
    lines = findings_lines(REPORT)
    assert lines[0] == "Findings:"
    late_logit = [ln for ln in lines if "[flags.is_noisy.train.late_logit]" in ln]
    assert len(late_logit) == 1 and late_logit[0].startswith("  ✗ ")
    assert [ln for ln in lines if "[flags.is_noisy.train.late_softmax]" in ln][0].startswith("  - ")
    assert findings({"summary": SUMMARY}) == []
    assert findings_lines({"summary": SUMMARY})[1].startswith("  (none")


def test_normalize_against_is_stated():
    rep = {"summary": {**SUMMARY, "normalize_against": "train", "rows_without_reference": {"ood": {"9": 4}}}}
    (f,) = findings(rep)
    assert f["key"] == "summary.normalize_against"
    assert f["text"] == ("Every split's z is normalised against the class moments of split train "
                         "(vog.normalize_against): z says how unusual an example is for train; 4 rows of "
                         "classes train lacks have no z and are left out.")
