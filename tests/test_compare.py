import csv
import json

import numpy as np
import pytest
from scipy import stats

from spineseg import STRUCTURES
from spineseg.cli import main
from spineseg.errors import SpinesegError
from spineseg.eval.compare import COLUMNS, MEAN_IOU, compare_runs, holm, paired_tests, render_tables
from spineseg.eval.evaluate import write_reports


def _rows(values, patients=None, fold="", structures=STRUCTURES):
    """Per-slice rows: slice i of case c{i} has ``values[i]`` in every metric (HD = 1 - value)."""
    return [{"case": f"c{i}", "patient": "" if patients is None else patients[i], "fold": fold, "slice": 0,
             "structure": s, "dice": v, "iou": v, "ppv": v, "sensitivity": v, "hd": 1 - v, "hd95": 1 - v,
             "absent_both": False} for i, v in enumerate(values) for s in structures]


def test_paired_tests_find_a_consistent_shift_and_nothing_in_identical_runs():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.8, 0.9, 30)
    t = paired_tests(a, a + 0.05 + rng.normal(0, 0.005, 30))
    assert t["p_ttest"] < 1e-6 and t["p_wilcoxon"] < 1e-4 and t["mean_diff"] < 0
    assert paired_tests(a, a.copy())["p_ttest"] == 1.0


def test_holm_is_step_down_and_monotone():
    adj = holm([0.01, 0.04, 0.03, None])
    assert adj[:3] == pytest.approx([0.03, 0.06, 0.06]) and adj[3] is None


def _patient_runs():
    """4 patients x 10 slices; B beats A by a patient-specific margin (slices of a patient move together)."""
    rng = np.random.default_rng(3)
    patients = [f"P{i // 10}" for i in range(40)]
    margin = {"P0": 0.04, "P1": 0.001, "P2": 0.03, "P3": -0.002}
    a = rng.uniform(0.7, 0.8, 40)
    b = a + np.array([margin[p] for p in patients]) + rng.normal(0, 0.002, 40)
    return a, b, patients, [("A", _rows(a, patients)), ("B", _rows(b, patients))]


def test_tests_pair_per_patient_means_by_default():
    a, b, patients, runs = _patient_runs()
    cell = compare_runs(runs, reference="B", correction="none")["cells"][("A", "lamina", "dice")]
    pm = lambda v: np.array([v[np.array(patients) == p].mean() for p in sorted(set(patients))])  # noqa: E731
    assert cell["n_pairs"] == 4 and cell["n_patients"] == 4 and cell["n_slices"] == 40
    assert cell["p_ttest"] == pytest.approx(stats.ttest_rel(pm(a), pm(b)).pvalue)
    per_slice = compare_runs(runs, reference="B", pairing="slice", correction="none")["cells"][("A", "lamina", "dice")]
    assert per_slice["n_pairs"] == 40 and per_slice["p_ttest"] < cell["p_ttest"]  # 40 "independent" slices overstate


def test_means_and_pvalues_use_the_same_slices():
    a = np.linspace(0.6, 0.9, 12)
    b = a + 0.03
    ra, rb = _rows(a), _rows(b)
    for r in rb:  # run B missed the lamina of slice c0: Dice 0 counts, HD is missing
        if r["case"] == "c0" and r["structure"] == "lamina":
            r.update(dice=0.0, hd=None, hd95=None)
    res = compare_runs([("A", ra), ("B", rb)], reference="B", pairing="slice")
    hd_a, hd_b = res["cells"][("A", "lamina", "hd95")], res["cells"][("B", "lamina", "hd95")]
    assert hd_a["n_slices"] == hd_b["n_slices"] == hd_a["n_pairs"] == 11
    assert hd_a["mean"] == pytest.approx(np.mean(1 - a[1:])) and hd_b["mean"] == pytest.approx(np.mean(1 - b[1:]))
    assert res["cells"][("B", "lamina", "dice")]["n_slices"] == 12  # Dice 0 is a value, not a gap
    assert "HD95 of lamina: 11 slices" in render_tables(res)["md"]


def test_holm_runs_over_every_test_of_the_table():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.7, 0.8, 25)
    runs = [("unet", _rows(base + rng.normal(0, 0.01, 25))), ("segnet", _rows(base - 0.05 + rng.normal(0, 0.01, 25))),
            ("spineseg", _rows(base))]
    res = compare_runs(runs, reference="spineseg", pairing="slice")
    tested = [c for (n, *_), c in res["cells"].items() if n != "spineseg"]
    assert res["n_tests"] == len(tested) == 2 * len(COLUMNS)
    raw = [c["p_ttest"] for c in tested]
    assert [c["p"] for c in tested] == pytest.approx(holm(raw))
    smallest = min(tested, key=lambda c: c["p_ttest"])
    assert smallest["p"] == pytest.approx(min(1.0, res["n_tests"] * smallest["p_ttest"]))


def test_mean_iou_averages_the_structures_present_on_each_slice():
    ra = _rows([0.9, 0.6])
    for r in ra:
        if r["structure"] == "lamina":
            r["iou"] = 0.3
        if r["case"] == "c1" and r["structure"] == "vertebral_body":  # absent from truth and prediction
            r.update(absent_both=True, dice=None, iou=None, ppv=None, sensitivity=None, hd=None, hd95=None)
    cell = compare_runs([("A", ra)])["cells"][("A",) + MEAN_IOU]
    assert cell["mean"] == pytest.approx(np.mean([(0.9 + 0.9 + 0.3) / 3, (0.6 + 0.3) / 2]))


def test_folds_give_mean_and_std_over_fold_means():
    f0, f1 = np.array([0.8, 0.9]), np.array([0.6, 0.6, 0.7])
    rows = _rows(f0, fold="0") + [dict(r, case="d" + r["case"]) for r in _rows(f1, fold="1")]
    res = compare_runs([("A", rows)])
    cell = res["cells"][("A", "vertebral_body", "dice")]
    assert cell["n_folds"] == 2 and cell["n_slices"] == 5
    assert cell["fold_mean"] == pytest.approx(np.mean([0.85, 0.6333333]))
    assert cell["fold_std"] == pytest.approx(np.std([0.85, 0.6333333], ddof=1))  # sample SD, as papers report
    assert "### vertebral_body (over folds)" in render_tables(res)["md"]


def test_runs_of_one_model_in_several_folds_are_pooled():
    res = compare_runs([("A", _rows([0.8, 0.9], fold="0")), ("A", _rows([0.5], fold="1"))])
    assert res["models"] == ["A"] and res["cells"][("A", "lamina", "dice")]["n_slices"] == 3
    with pytest.raises(SpinesegError, match="same slices"):
        compare_runs([("A", _rows([0.8])), ("A", _rows([0.5]))])


def test_runs_on_different_slices_are_refused():
    with pytest.raises(SpinesegError, match="different test slices"):
        compare_runs([("A", _rows([0.8, 0.9, 0.7])), ("B", _rows([0.8, 0.9]))])


def test_every_table_states_patients_slices_and_pairing():
    _, _, _, runs = _patient_runs()
    res = compare_runs(runs, reference="B")
    text = render_tables(res)
    for table in text["md"].split("### ")[1:]:
        assert "n = 4 patients, 40 test slices" in table and "paired on per-patient means" in table
        assert "Holm-corrected over all 13 tests of this table" in table
    assert "n = 4 patients, 40 test slices" in text["tex"] and r"Holm-corrected" in text["tex"]
    row = next(csv.DictReader(text["csv"].splitlines()))
    assert row["n_patients"] == "4" and row["n_slices"] == "40" and row["pairing"] == "patient"
    per_slice = render_tables(compare_runs(runs, reference="B", pairing="slice"))["md"]
    assert "paired per slice (n = 40 pairs" in per_slice


def test_compare_cli_takes_patients_from_a_cases_file(tmp_path, capsys):
    a, b, patients, _ = _patient_runs()
    for name, values in (("A", a), ("B", b)):
        rows = _rows(values)  # no patient column, as in older per_slice.csv files
        write_reports(rows, tmp_path / name)
        (tmp_path / name / "run.json").write_text(json.dumps({"name": name}))
    (tmp_path / "cases.csv").write_text("case,patient\n" + "".join(f"c{i},{p}\n" for i, p in enumerate(patients)))
    runs = [str(tmp_path / "A"), str(tmp_path / "B")]
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp"), "--patients", str(tmp_path / "cases.csv")]) == 0
    md = (tmp_path / "cmp" / "tables.md").read_text()
    assert "n = 4 patients, 40 test slices" in md and "Patients: `cases.csv`" in md
    assert (tmp_path / "cmp" / "bar_dice.png").stat().st_size > 5000
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp2")]) == 0
    md = (tmp_path / "cmp2" / "tables.md").read_text()
    assert "n = 40 patients" in md and "each case is treated as its own patient" in md
    capsys.readouterr()
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp3"), "--patients", str(tmp_path / "nope.csv")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _empty_body_runs():
    """6 patients x 4 slices, the truth without a body on slice 3 of each case; A draws a false body there
    (Dice 0, no HD), B draws none. Slice 2 of each case is empty of body in truth and in both models."""
    runs = []
    for name in ("A", "B"):
        rows = []
        for i in range(6):
            for k in range(4):
                for s in STRUCTURES:
                    r = {"case": f"c{i}", "patient": f"P{i}", "fold": "", "slice": k, "structure": s, "dice": 0.9,
                         "iou": 0.8, "ppv": 0.9, "sensitivity": 0.9, "hd": 1.0, "hd95": 1.0, "absent_both": False}
                    if s == "vertebral_body" and (k == 2 or (k == 3 and name == "B")):
                        r.update(absent_both=True, dice=None, iou=None, ppv=None, sensitivity=None, hd=None, hd95=None)
                    elif s == "vertebral_body" and k == 3:  # A's false body
                        r.update(dice=0.0, iou=0.0, ppv=0.0, sensitivity=None, hd=None, hd95=None)
                    rows.append(r)
        runs.append((name, rows))
    return runs


def test_a_false_body_on_an_empty_slice_counts_against_its_model_and_keeps_the_slice():
    res = compare_runs(_empty_body_runs(), reference="B")
    a, b = res["cells"][("A", "vertebral_body", "dice")], res["cells"][("B", "vertebral_body", "dice")]
    assert a["n_slices"] == b["n_slices"] == 18  # slices 0, 1, 3 of 6 cases; slice 2 is empty everywhere
    assert b["mean"] == pytest.approx(0.9 * 2 / 3 + 1 / 3) and a["mean"] == pytest.approx(0.9 * 2 / 3)
    assert b.get("best") and not a.get("best")
    assert a["n_nonzero_pairs"] == 6 and a["mean_diff"] < 0
    col = res["columns"][("vertebral_body", "dice")]
    assert col["left_out"] == 0 and col["empty_in_every_model"] == 6
    hd = res["columns"][("vertebral_body", "hd95")]
    assert hd["n_slices"] == 12 and hd["left_out"] == 6  # no HD95 for A's false body: those slices leave HD95
    miou_a, miou_b = (res["cells"][(n,) + MEAN_IOU]["mean"] for n in "AB")
    assert miou_a < miou_b


def test_the_table_mean_is_over_the_units_the_test_pairs():
    # one patient with 60 slices where A is better; nine patients with 2 slices each where A is worse
    patients = ["P0"] * 60 + [f"P{1 + i // 2}" for i in range(18)]
    a = np.array([0.95] * 60 + [0.70] * 18)
    b = np.array([0.85] * 60 + [0.75 + 0.001 * i for i in range(18)])
    runs = [("A", _rows(a, patients)), ("B", _rows(b, patients))]
    res = compare_runs(runs, reference="B", correction="none")
    cell = res["cells"][("A", "lamina", "dice")]
    pm = lambda v: np.array([v[np.array(patients) == p].mean() for p in sorted(set(patients))])  # noqa: E731
    assert cell["mean"] == pytest.approx(pm(a).mean()) and cell["std"] == pytest.approx(pm(a).std(ddof=1))
    assert cell["slice_mean"] == pytest.approx(a.mean()) and cell["slice_mean"] > res["cells"][("B", "lamina", "dice")]["slice_mean"]
    assert res["cells"][("B", "lamina", "dice")].get("best")  # B is better per patient, as the test says
    assert cell["mean_diff"] < 0
    assert "Mean ± sample std over per-patient means" in render_tables(res)["md"]
    per_slice = compare_runs(runs, reference="B", pairing="slice", correction="none")
    assert per_slice["cells"][("A", "lamina", "dice")]["mean"] == pytest.approx(a.mean())
    assert per_slice["cells"][("A", "lamina", "dice")].get("best")


def test_a_difference_without_spread_gives_no_t_test_p_value():
    x = np.array([0.7, 0.8, 0.75])
    t = paired_tests(x + 0.01, x)
    assert t["p_ttest"] is None and t["p_wilcoxon"] == pytest.approx(0.25) and t["n_nonzero_pairs"] == 3
    t = paired_tests(np.r_[x, x + 0.5], np.r_[x, x])  # three zero differences are dropped by Wilcoxon
    assert t["n_pairs"] == 6 and t["n_nonzero_pairs"] == 3


def test_a_wilcoxon_table_that_cannot_mark_any_cell_says_so():
    _, _, _, runs = _patient_runs()  # 4 patients: the smallest exact two-sided Wilcoxon p is 2 / 2**4 = 0.125
    res = compare_runs(runs, reference="B", test="wilcoxon")
    assert stats.wilcoxon([0.1, 0.2, 0.3, 0.4]).pvalue == pytest.approx(0.125)  # all four of one sign: the floor
    assert all(c["p_wilcoxon"] >= 0.125 for (n, *_), c in res["cells"].items() if n == "A" and c["p_wilcoxon"])
    assert "smallest possible two-sided Wilcoxon p is 0.12" in render_tables(res)["md"]
    assert "smallest possible" not in render_tables(compare_runs(runs, reference="B"))["md"]  # the t-test can


def test_bar_charts_say_what_their_bars_average_as_the_tables_do(tmp_path, monkeypatch):
    # the default pairing averages per-patient means: the chart must not call its bars means over test slices
    import matplotlib.pyplot as plt

    from spineseg.eval.figures import bar_charts

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), close(fig)))
    _, _, _, runs = _patient_runs()
    bar_charts(compare_runs(runs, reference="B"), tmp_path)
    bar_charts(compare_runs(runs, reference="B", pairing="slice"), tmp_path)
    labels = [f.axes[0].get_xlabel() for f in figs]
    assert len(labels) == 4
    assert all("per-patient means" in x and "over test slices" not in x for x in labels[:2]), labels
    assert all("over test slices" in x for x in labels[2:]), labels
    assert all("n = 4 patients, 40 slices" in x for x in labels)
