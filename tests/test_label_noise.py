"""Symmetric label noise (examples/_common.py, used by the examples and benchmarks/paper_regime.py) and the tables of
benchmarks/label_noise.py and benchmarks/rho_sensitivity.py, on hand-made records."""

from __future__ import annotations

import gzip
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common  # noqa: E402
import cheap_sharpness  # noqa: E402
import image_classification  # noqa: E402
import image_task  # noqa: E402
import label_noise  # noqa: E402
import noise_study  # noqa: E402
import paper_regime  # noqa: E402
import rho_sensitivity  # noqa: E402

LABELS = [i % 7 for i in range(1003)]


# ---------------------------------------------------------------------- the noise function
@pytest.mark.parametrize("fraction", [0.2, 0.37, 0.4, 0.999])
def test_flips_exactly_round_f_n_labels_to_other_valid_classes(fraction):
    noisy = _common.symmetric_label_noise(LABELS, 7, fraction, seed=3)
    changed = [i for i, (a, b) in enumerate(zip(LABELS, noisy)) if a != b]
    assert len(noisy) == len(LABELS) and len(changed) == round(fraction * len(LABELS))  # none kept its own label
    assert set(noisy) <= set(range(7))


def test_a_flipped_label_is_uniform_over_the_other_classes():
    noisy = _common.symmetric_label_noise([0] * 3000, 4, 0.9, seed=0)
    counts = Counter(noisy)
    assert counts[0] == 300 and sorted(counts) == [0, 1, 2, 3]
    assert all(800 < counts[k] < 1000 for k in (1, 2, 3))  # 900 each expected; sd ~ 24


def test_noise_is_deterministic_in_its_seed_and_zero_is_the_identity():
    a = _common.symmetric_label_noise(LABELS, 7, 0.2, seed=5)
    assert a == _common.symmetric_label_noise(LABELS, 7, 0.2, seed=5)
    assert a != _common.symmetric_label_noise(LABELS, 7, 0.2, seed=6)
    assert _common.symmetric_label_noise(LABELS, 7, 0.0, seed=5) == LABELS


def digits_data(*flags: str):
    types = (image_classification.ModelArguments, image_classification.DataArguments,
             image_classification.XSAMTrainingArguments)
    _, data_args, _ = image_classification.parse_args(types, image_classification.TRAINING_DEFAULTS, list(flags))
    return image_classification.load_digits_data(data_args).prepare(data_args)


def test_the_image_example_flips_training_labels_only_the_same_for_every_optimizer():
    clean = digits_data()
    noisy = {optim: digits_data("--optim", optim, "--label_noise", "0.3", "--max_train_samples", "1000")
             for optim in ("xsam", "sam", "adamw_torch")}
    assert noisy["xsam"].splits["train"].labels == noisy["sam"].splits["train"].labels \
        == noisy["adamw_torch"].splits["train"].labels
    train = noisy["xsam"].splits["train"]
    flipped = sum(a != b for a, b in zip(clean.splits["train"].labels[:1000], train.labels))
    assert len(train) == 1000 and flipped == 300
    assert train.inputs == clean.splits["train"].inputs[:1000]  # the same images
    for split in ("validation", "test"):
        assert noisy["xsam"].splits[split].labels == clean.splits[split].labels
        assert noisy["xsam"].splits[split].inputs == clean.splits[split].inputs
    assert "300 of 1000 training labels flipped" in noisy["xsam"].description
    other_seed = digits_data("--label_noise", "0.3", "--max_train_samples", "1000", "--label_noise_seed", "1")
    assert other_seed.splits["train"].labels != train.labels


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_paper_regime_noise_and_clean_validation(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 40)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    base = ["--data_dir", str(tmp_path), "--train_size", "100"]
    (x, y, x_test, y_test), val = image_task.prepare_data(paper_regime.parse_args(base))
    x_all, y_all, _, _ = image_task.load_data("fashion_mnist", str(tmp_path))
    pick = torch.randperm(300, generator=torch.Generator().manual_seed(1234))[:100]
    assert val is None and torch.equal(x, x_all[pick]) and torch.equal(y, y_all[pick])  # the subset as before
    (xn, yn, xn_test, yn_test), (x_val, y_val) = image_task.prepare_data(
        paper_regime.parse_args([*base, "--label_noise", "0.4", "--val_size", "50"]))
    assert torch.equal(xn, x) and int((yn != y).sum()) == 40 and int(yn.max()) <= 9
    assert torch.equal(xn_test, x_test) and torch.equal(yn_test, y_test)
    held = torch.randperm(300, generator=torch.Generator().manual_seed(1234))[250:]
    assert torch.equal(y_val, y_all[held]) and not set(held.tolist()) & set(pick.tolist())


# ---------------------------------------------------------------------- bad values
@pytest.mark.parametrize("value", [1.5, -0.1, 1.0])
def test_bad_noise_fractions_are_refused(value):
    expected = rf"--label_noise={value} is invalid: must be a fraction in \[0, 1\)"
    with pytest.raises(ValueError, match=expected):
        image_classification.DataArguments(label_noise=value)
    with pytest.raises(ValueError, match=expected):
        digits_data("--label_noise", str(value))
    with pytest.raises(ValueError, match=expected):
        paper_regime.parse_args(["--label_noise", str(value)])
    with pytest.raises(ValueError, match=expected):
        _common.symmetric_label_noise(LABELS, 7, value, seed=0)
    with pytest.raises(ValueError, match=rf"--noise_levels={value} is invalid: must be a fraction in \[0, 1\)"):
        label_noise.parse_args(["--task", "text", "--noise_levels", "0", str(value), "--json", "x.json"])


# ---------------------------------------------------------------------- the tables
def record(test, train=0.9, alpha=None, psi=None):
    return dict(val_acc=test - 0.01, test_acc=test, train_acc=train, mean_alpha=alpha, mean_psi=psi, seconds=10.0)


def test_label_noise_table_paired_gaps_and_their_standard_errors():
    tests = {"base": [0.80, 0.82, 0.84], "sam": [0.81, 0.85, 0.83], "xsam": [0.83, 0.86, 0.85]}
    rho = {"base": None, "sam": 0.05, "xsam": 0.1}
    runs = {noise_study.run_key(m, 0.2, rho[m], s): record(acc, train=0.7 + 0.01 * s, alpha=1.5 if m == "xsam"
                                                          else None, psi=0.3)
            for m, accs in tests.items() for s, acc in enumerate(accs)}
    rows = label_noise.summary_rows(runs, [0.2], [0, 1, 2], {0.2: {"sam": 0.05, "xsam": 0.1}})
    base, sam, xsam = rows
    assert [r["method"] for r in rows] == ["base", "sam", "xsam"] and xsam["rho"] == 0.1
    assert base["test"] == pytest.approx((0.82, 0.02)) and base["vs_base"] is None
    # XSAM - AdamW per seed: 0.03, 0.04, 0.01; sd 0.015275, SE = sd / sqrt(3)
    assert xsam["vs_base"] == pytest.approx((0.0266667, 0.0088192, 3), abs=1e-7)
    assert xsam["vs_sam"] == pytest.approx((0.0166667, 0.0033333, 3), abs=1e-7)  # 0.02, 0.01, 0.02
    assert sam["vs_base"] == pytest.approx((0.01, 0.0115470, 3), abs=1e-7) and sam["vs_sam"] is None  # .01 .03 -.01
    assert xsam["train"] == pytest.approx(0.71) and xsam["mean_alpha"] == 1.5 and sam["mean_alpha"] is None
    table = label_noise.results_table(rows, "AdamW")
    assert "| 0.2 | XSAM rho 0.1 | 3 | 0.8467 ± 0.0153 | +0.0267 ± 0.0088 | +0.0167 ± 0.0033 | 0.7100 |" in table
    assert noise_study.paired_gap({0: 0.5}, {0: 0.4})[1] != noise_study.paired_gap({0: 0.5}, {0: 0.4})[1]  # nan
    assert noise_study.paired_gap({0: 0.5}, {1: 0.4}) is None
    assert noise_study.choose_rho({0.1: 0.9, 0.05: 0.9, 0.2: 0.8}) == 0.05  # a tie goes to the smaller rho


def test_rho_sensitivity_flat_range_within_one_point():
    means = {0.005: 0.80, 0.01: 0.85, 0.02: 0.89, 0.05: 0.90, 0.1: 0.892, 0.2: 0.88, 0.5: 0.895, 1.0: 0.70}
    # 0.02 is exactly 1 point below (inclusive); 0.5 is within 1 point but not next to the best's range
    assert rho_sensitivity.flat_range(means, 0.01) == (0.05, 0.02, 0.1)
    assert rho_sensitivity.flat_range(means, 0.001) == (0.05, 0.05, 0.05)
    points = {"base": {None: (0.85, 0.01)}, "sam": {r: (m, 0.005) for r, m in means.items()},
              "xsam": {r: (m, 0.0) for r, m in {**means, 0.05: 0.80, 0.1: 0.89, 0.2: 0.888}.items()}}
    text = rho_sensitivity.sensitivity_table(points, 0.01, "AdamW")
    assert "SAM: best 0.9000 at rho 0.05; within 1 pt of it: rho 0.02-0.1, x5" in text
    assert "XSAM: best 0.8950 at rho 0.5; within 1 pt of it: rho 0.1-0.5, x5" in text
    assert "| 0.05 | 0.9000 ± 0.0050 + | 0.8000 ± 0.0000 |" in text and "AdamW: 0.8500 ± 0.0100" in text


def test_rho_sensitivity_curves_average_the_seeds():
    runs = {noise_study.run_key("sam", 0.0, 0.1, s): record(acc) for s, acc in enumerate([0.8, 0.9, 0.7])}
    runs[noise_study.run_key("base", 0.0, None, 0)] = record(0.6)
    points = rho_sensitivity.curves(runs, [0.1, 0.2], [0, 1, 2])
    assert set(points) == {"base", "sam"} and points["base"] == {None: (0.6, 0.0)}
    assert points["sam"][0.1] == pytest.approx((0.8, 0.1)) and 0.2 not in points["sam"]
    assert not math.isnan(points["sam"][0.1][1])


def test_a_study_split_over_processes_merges_and_another_study_is_refused(tmp_path):
    config = {"task": "fashion_mnist", "train_examples": 2000}
    a, b = noise_study.Store(str(tmp_path / "a.json"), config), noise_study.Store(str(tmp_path / "b.json"), config)
    a.get(noise_study.run_key("base", 0.4, None, 0), lambda: record(0.6), "a")
    b.get(noise_study.run_key("base", 0.4, None, 0), lambda: record(0.9), "b")  # a's copy is kept
    b.get(noise_study.run_key("sam", 0.2, 0.1, 0), lambda: record(0.7), "b")
    a.merge([b.path])
    again = noise_study.Store(a.path, config)  # merged runs are saved
    assert {k: r["test_acc"] for k, r in again.data["runs"].items()} == {"base|0.4|-|0": 0.6, "sam|0.2|0.1|0": 0.7}
    other = noise_study.Store(str(tmp_path / "c.json"), {**config, "train_examples": 1000})
    other.get(noise_study.run_key("base", 0.4, None, 0), lambda: record(0.5), "c")
    with pytest.raises(ValueError, match=r"--merge='.*c\.json' holds runs of .*'train_examples': 1000.*same study"):
        a.merge([other.path])
    assert len(noise_study.Store(a.path, config).data["runs"]) == 2


def test_label_noise_plot_draws_test_accuracy_and_the_fit_of_the_noisy_labels(monkeypatch):
    figures = []
    monkeypatch.setattr(label_noise.harness, "save_figure", lambda fig, path: figures.append((fig, path)))
    rows = [dict(noise=n, method=m, test=(t, 0.01), train=f)
            for n, m, t, f in [(0.0, "base", 0.85, 0.99), (0.4, "base", 0.63, 0.98), (0.0, "xsam", 0.86, 0.95),
                               (0.4, "xsam", 0.80, 0.59)]]
    label_noise.plot(rows, "out.png", "title", "SGD")
    (fig, path), = figures
    test_ax, train_ax = fig.axes
    assert path == "out.png" and [t.get_text() for t in test_ax.get_legend().get_texts()] == ["SGD", "XSAM"]
    assert [(bars.get_label(), list(bars.lines[0].get_ydata())) for bars in test_ax.containers] == [
        ("SGD", [0.85, 0.63]), ("XSAM", [0.86, 0.80])]
    assert [list(line.get_ydata()) for line in train_ax.get_lines()] == [[0.99, 0.98], [0.95, 0.59], [1.0, 0.6]]


@pytest.mark.parametrize(("method", "parsed", "name"), [
    ("base", ("base", 1, False), "SGD"), ("xsam", ("xsam", 1, False), "XSAM"),
    ("xsam_n4", ("xsam", 4, False), "XSAM N=4"), ("sam_n4_reuse", ("sam", 4, True), "SAM N=4 reuse"),
    ("xsam_n12_reuse", ("xsam", 12, True), "XSAM N=12 reuse"),
])
def test_methods_and_their_names(method, parsed, name):
    assert noise_study.parse_method(method) == parsed
    assert noise_study.method_name(method, "SGD") == name
    assert noise_study.method_name(method, "SGD", 0.1) == f"{name} rho 0.1"


@pytest.mark.parametrize("method", ["xsam_n1", "xsam_n0_reuse", "adamw", "xsam_reuse", "sam_n4reuse"])
def test_bad_methods_are_refused(method):
    with pytest.raises(ValueError, match=rf"method='{method}' is invalid: must be base, sam, xsam, or "
                                         r"<sam\|xsam>_n<N>\[_reuse\] with N >= 2"):
        noise_study.parse_method(method)
    with pytest.raises(ValueError, match=rf"method='{method}' is invalid"):
        label_noise.parse_args(["--task", "text", "--methods", "base", method, "--json", "x.json"])


def cheap_runs():
    """Test accuracies per method and seed at 40% noise: SGD, XSAM, a cheap mode keeping most of the gain."""
    tests = {"base": [0.60, 0.62, 0.64], "xsam": [0.80, 0.80, 0.82], "xsam_n4_reuse": [0.79, 0.78, 0.81],
             "xsam_n4": [0.70, 0.69, 0.73]}
    rho = {"base": None, "xsam": 0.1, "xsam_n4_reuse": 0.1, "xsam_n4": 0.1}
    return {noise_study.run_key(m, 0.4, rho[m], s): dict(record(acc), steps=100, seconds=10.0 * (1 + (m != "base")))
            for m, accs in tests.items() for s, acc in enumerate(accs)}


def test_label_noise_rows_of_a_cheap_mode_take_its_familys_rho_and_compare_with_its_full_method():
    methods = ["base", "xsam", "xsam_n4_reuse"]
    rows = label_noise.summary_rows(cheap_runs(), [0.4], [0, 1, 2], {0.4: {"xsam": 0.1}}, methods)
    assert [(r["method"], r["rho"]) for r in rows] == [("base", None), ("xsam", 0.1), ("xsam_n4_reuse", 0.1)]
    assert rows[2]["vs_full"] == pytest.approx((-0.0133333, 0.0033333, 3), abs=1e-7)  # -.01 -.02 -.01
    assert rows[1]["vs_full"] is None
    table = label_noise.results_table(rows, "SGD")
    assert "gap to its full method (paired ± SE)" in table and "| XSAM N=4 reuse rho 0.1 | 3 |" in table
    assert "| 20 |" in table.splitlines()[-1]  # without --cost: the runs' own median seconds


def test_label_noise_compares_looksam_with_sam_and_shows_the_quiet_cost():
    runs = {**cheap_runs(), **{noise_study.run_key(m, 0.4, 0.1, s): dict(record(acc), steps=100, seconds=30.0)
                               for m, accs in (("sam", [0.75, 0.77, 0.79]), ("sam_n4_reuse", [0.74, 0.77, 0.76]))
                               for s, acc in enumerate(accs)}}
    cost = {"base": 1.0, "sam": 2.0, "sam_n4_reuse": 1.3}  # cost.py's keys (ratios_to_base); XSAM not timed
    rows = label_noise.summary_rows(runs, [0.4], [0, 1, 2], {0.4: {"sam": 0.1, "xsam": 0.1}},
                                    ["base", "sam", "xsam", "sam_n4_reuse"], cost)
    by = {r["method"]: r for r in rows}
    assert by["sam_n4_reuse"]["vs_full"] == pytest.approx((-0.0133333, 0.0088192, 3), abs=1e-6)  # -.01 0 -.03
    assert by["xsam"]["vs_sam"] == pytest.approx((0.0366667, 0.0066667, 3), abs=1e-6)  # .05 .03 .03
    assert by["sam_n4_reuse"]["vs_sam"] is None and by["sam"]["vs_full"] is None
    assert [r["cost"] for r in rows] == [1.0, 2.0, None, 1.3]
    table = label_noise.results_table(rows, "AdamW").splitlines()
    assert "cost per step vs AdamW (cost.py)" in table[0] and "| 0.4 | XSAM rho 0.1 | 3 |" in table[4]
    assert [line.rsplit("|", 2)[1] for line in table[2:]] == [" 1.00x ", " 2.00x ", " - ", " 1.30x "]


def test_label_noise_plot_at_one_noise_level_draws_one_point_and_one_bar_per_method(monkeypatch):
    figures = []
    monkeypatch.setattr(label_noise.harness, "save_figure", lambda fig, path: figures.append((fig, path)))
    rows = [dict(noise=0.4, method=m, rho=rho, test=(t, 0.01), train=f, cost=c)
            for m, rho, t, f, c in [("base", None, 0.57, 0.97, 1.0), ("xsam", 0.05, 0.66, 0.56, 2.2)]]
    label_noise.plot(rows, "out.png", "title", "AdamW")
    (fig, _), = figures
    test_ax, train_ax = fig.axes
    assert [list(bars.lines[0].get_ydata()) for bars in test_ax.containers] == [[0.57], [0.66]]
    assert [bar.get_height() for bar in train_ax.patches] == [0.97, 0.56]
    assert [t.get_text() for t in train_ax.get_xticklabels()] == ["AdamW\n1.00x", "XSAM\nrho 0.05\n2.20x"]


def test_cheap_sharpness_share_of_xsams_gain_kept():
    rows = cheap_sharpness.summary_rows(cheap_runs(), [0.4], [0, 1, 2], ["base", "xsam", "xsam_n4_reuse", "xsam_n4"],
                                        {0.4: {"xsam": 0.1}}, {"xsam_n4_reuse": 1.2})
    kept = {r["method"]: r["kept"] for r in rows}
    # XSAM - SGD: .20 .18 .18 (mean .18667); reuse - SGD: .19 .16 .17 (.17333); plain N=4: .10 .07 .09 (.08667)
    assert kept["xsam_n4_reuse"] == pytest.approx(0.17333 / 0.18667, abs=1e-4)
    assert kept["xsam_n4"] == pytest.approx(0.08667 / 0.18667, abs=1e-4)
    assert kept["base"] is None and kept["xsam"] == pytest.approx(1.0)
    assert [r["cost"] for r in rows] == [None, None, 1.2, None]
    assert rows[1]["step_s"] == pytest.approx(0.2)
    assert cheap_sharpness.kept_overall(rows) == pytest.approx(
        {"xsam": 1.0, "xsam_n4_reuse": 0.17333 / 0.18667, "xsam_n4": 0.08667 / 0.18667}, abs=1e-4)
    table = cheap_sharpness.results_table(rows)
    assert "| 0.4 | XSAM N=4 reuse | 0.1 | 3 | 0.7933 ± 0.0153 | 0.900 | +17.3 ± 0.9 pt | -1.3 ± 0.3 pt | 93% | " \
        "1.20x |" in table
    assert "| 0.4 | XSAM | 0.1 | 3 | 0.8067 ± 0.0115 | 0.900 | +18.7 ± 0.7 pt | - | 100% | - |" in table
    for row in rows:
        row["cost"] = None
    assert "| 0.4 | XSAM | 0.1 | 3 | 0.8067 ± 0.0115 | 0.900 | +18.7 ± 0.7 pt | - | 100% | 200 |" in \
        cheap_sharpness.results_table(rows)  # without --cost: the runs' own ms per step


def test_label_noise_report_trains_nothing_and_leaves_missing_runs_out(tmp_path, monkeypatch, capsys):
    """--report: the rho of SAM from the grid runs there are (no XSAM run: no XSAM row), methods over the seeds they
    have; a missing run is never trained."""
    monkeypatch.setattr(label_noise, "runner_for", lambda *a: pytest.fail("a run was trained"))
    monkeypatch.setattr(label_noise.harness, "save_figure", lambda fig, path: None)
    path = str(tmp_path / "study.json")
    config = {"task": "text", "label_noise_seed": 0, "train_examples": 1000, "num_train_epochs": 6, "extra": []}
    store = noise_study.Store(path, config)
    runs = {("sam", 0.02, 0): 0.60, ("sam", 0.05, 0): 0.66, ("sam", 0.05, 1): 0.64, ("base", None, 0): 0.57,
            ("base", None, 1): 0.58, ("base", None, 2): 0.56, ("sam_n4_reuse", 0.05, 0): 0.65}
    for (method, rho, seed), acc in runs.items():
        store.get(noise_study.run_key(method, 0.4, rho, seed), lambda acc=acc: record(acc), "made")
    summary = label_noise.main(["--task", "text", "--train_examples", "1000", "--num_train_epochs", "6",
                                "--noise_levels", "0.4", "--rhos", "0.02", "0.05", "0.1", "--seeds", "0", "1", "2",
                                "--methods", "base", "sam", "xsam", "sam_n4_reuse", "--json", path, "--report"])
    assert summary["chosen_rho"] == {"0.4": {"sam": 0.05}}
    assert [(r["method"], r["seeds"]) for r in summary["rows"]] == [("base", 3), ("sam", 2), ("sam_n4_reuse", 1)]
    assert summary["rows"][1]["vs_base"] == pytest.approx((0.075, 0.015, 2))  # .09 .06
    assert "| 0.4 | SAM N=4 reuse rho 0.05 | 1 |" in capsys.readouterr().out
