"""Continual-learning measures on hand-made matrices (values worked out by hand), their plots, and replay."""

from __future__ import annotations

import math

import pytest

from peft_hft.continual import AccuracyMatrix, ReplayBuffer, plot_accuracy_matrix, plot_task_curves, summary_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def matrix():
    # rows: after stage 0 (task a), 1 (task b), 2 (task c); columns: tasks a, b, c
    return AccuracyMatrix(
        tasks=("a", "b", "c"),
        stages=("a", "b", "c"),
        scores=((0.80, 0.30, 0.20), (0.60, 0.90, 0.25), (0.50, 0.70, 0.85)),
        base=(0.50, 0.20, 0.10),
    )


def test_op_bwt_fwt_and_forgetting_by_hand(matrix):
    # OP: mean of the last row = (0.50 + 0.70 + 0.85) / 3
    assert matrix.op() == pytest.approx(0.683333333)
    # BWT: ((0.50 - 0.80) + (0.70 - 0.90)) / 2
    assert matrix.bwt() == pytest.approx(-0.25)
    # FWT: score just before training minus base: ((0.30 - 0.20) + (0.25 - 0.10)) / 2
    assert matrix.fwt() == pytest.approx(0.125)
    # forgetting: best score after training minus final: ((0.80 - 0.50) + (0.90 - 0.70)) / 2
    assert matrix.forgetting() == pytest.approx(0.25)
    assert matrix.summary() == pytest.approx({"OP": 0.683333333, "BWT": -0.25, "FWT": 0.125, "forgetting": 0.25})


def test_forgetting_uses_the_best_score_not_the_one_right_after_training():
    m = AccuracyMatrix(("a", "b", "c"), ("a", "b", "c"), ((0.5, 0, 0), (0.7, 0.6, 0), (0.4, 0.5, 0.9)))
    assert m.bwt() == pytest.approx(((0.4 - 0.5) + (0.5 - 0.6)) / 2)
    assert m.forgetting() == pytest.approx(((0.7 - 0.4) + (0.6 - 0.5)) / 2)
    with pytest.raises(ValueError, match="base model's scores"):
        m.fwt()


def test_extra_evaluation_tasks_do_not_enter_op_and_bwt():
    m = AccuracyMatrix.from_records(
        stage_tasks=["a", "b"],
        stage_metrics=[{"a": 0.9, "b": 0.4, "general": 0.6}, {"a": 0.7, "b": 0.8, "general": 0.5}],
        base_metrics={"a": 0.3, "b": 0.35, "general": 0.65},
    )
    assert m.tasks == ("a", "b", "general")
    assert m.op() == pytest.approx(0.75)
    assert m.bwt() == pytest.approx(-0.2)
    assert m.fwt() == pytest.approx(0.05)
    assert m.score(1, "general") == 0.5


def test_missing_scores_are_nan_and_shapes_are_checked():
    m = AccuracyMatrix.from_records(["a", "b"], [{"a": 1.0}, {"a": 0.5, "b": 0.5}])
    assert math.isnan(m.score(0, "b"))
    with pytest.raises(ValueError, match="2 rows for 1 stages"):
        AccuracyMatrix(("a",), ("a",), ((1.0,), (0.5,)))
    with pytest.raises(ValueError, match="no evaluation column"):
        AccuracyMatrix(("a",), ("b",), ((1.0,),))


def test_tables(matrix):
    table = matrix.to_markdown()
    assert table.splitlines()[0] == "| after stage | a | b | c |"
    assert "| base model | 50.0 | 20.0 | 10.0 |" in table
    assert "| 2: c | 50.0 | 70.0 | 85.0 |" in table
    comparison = summary_table({"FFT": matrix, "HFT": matrix})
    assert comparison.splitlines()[0] == "| method | OP | BWT | FWT | forgetting |"
    assert "| HFT | 68.3 | -25.0 | 12.5 | 25.0 |" in comparison


def test_plots_are_pngs(matrix, tmp_path):
    for path in (
        plot_accuracy_matrix(matrix, tmp_path / "one.png"),
        plot_accuracy_matrix({"FFT": matrix, "HFT": matrix}, tmp_path / "two.png", title="t"),
        plot_task_curves({"FFT": matrix, "HFT": matrix}, tmp_path / "curves" / "c.png"),
    ):
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE


def test_replay_mixes_the_requested_share_evenly_and_reproducibly():
    buffer = ReplayBuffer(fraction=0.2, seed=0)
    current = [f"c{i}" for i in range(80)]
    assert buffer.mix(current) == current  # nothing to replay yet
    buffer.add("a", [f"a{i}" for i in range(50)])
    buffer.add("b", [f"b{i}" for i in range(6)])
    assert buffer.replay_counts(80) == {"a": 14, "b": 6}  # 20 = 80 * 0.2 / 0.8; b runs out, a makes up for it
    mixed = buffer.mix(current)
    assert len(mixed) == 100 and len(set(mixed)) == 100
    assert sorted(x for x in mixed if x.startswith("c")) == sorted(current)
    assert sum(x.startswith("a") for x in mixed) == 14 and sum(x.startswith("b") for x in mixed) == 6
    assert mixed != sorted(mixed)  # shuffled together
    again = ReplayBuffer(fraction=0.2, seed=0)
    again.add("a", [f"a{i}" for i in range(50)])
    again.add("b", [f"b{i}" for i in range(6)])
    assert again.mix(current) == mixed
    assert ReplayBuffer(0.5, seed=0).replay_counts(10) == {}
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        ReplayBuffer(fraction=1.0)
    with pytest.raises(ValueError, match="already in the replay buffer"):
        buffer.add("a", ["x"])


def test_replay_with_datasets():
    datasets = pytest.importorskip("datasets")
    buffer = ReplayBuffer(fraction=0.5, seed=1)
    buffer.add("a", datasets.Dataset.from_dict({"text": [f"a{i}" for i in range(10)]}))
    mixed = buffer.mix(datasets.Dataset.from_dict({"text": [f"c{i}" for i in range(4)]}))
    assert isinstance(mixed, datasets.Dataset)
    assert len(mixed) == 8 and sum(t.startswith("a") for t in mixed["text"]) == 4


def _shifted(matrix, delta):
    return AccuracyMatrix(matrix.tasks, matrix.stages, tuple(tuple(x + delta for x in row) for row in matrix.scores),
                          matrix.base)


def test_seed_summary_pairs_seeds_against_the_reference(matrix):
    from peft_hft.continual import mean_matrix, own_stage_scores, seed_summary, seed_summary_table

    fft = [matrix, _shifted(matrix, -0.1), _shifted(matrix, 0.1)]
    # a method whose last row is 0.05 higher on every seed: OP +0.05, BWT +0.05, forgetting -0.05, FWT unchanged
    hft = []
    for m in fft:
        scores = m.scores[:-1] + (tuple(x + 0.05 for x in m.scores[-1]),)
        hft.append(AccuracyMatrix(m.tasks, m.stages, scores, m.base))
    summary = seed_summary({"fft": fft, "hft": hft}, reference="fft")
    assert summary["fft"]["OP"]["values"] == pytest.approx([0.683333, 0.583333, 0.783333], abs=1e-5)
    assert summary["fft"]["OP"]["ci95"] == pytest.approx([0.683333 - 4.303 * 0.1 / 3 ** 0.5,
                                                          0.683333 + 4.303 * 0.1 / 3 ** 0.5], abs=1e-5)
    paired = summary["hft"]["paired"]
    assert paired["OP"]["values"] == pytest.approx([0.05] * 3) and paired["BWT"]["mean"] == pytest.approx(0.05)
    assert paired["forgetting"]["mean"] == pytest.approx(-0.05) and paired["FWT"]["mean"] == pytest.approx(0.0)
    assert "paired" not in summary["fft"]
    table = seed_summary_table(summary, paired=True)
    assert table.splitlines()[2].startswith("| hft | +5.0 [+5.0, +5.0] (+5.0, +5.0, +5.0) |")
    assert len(table.splitlines()) == 3  # the reference has no paired row
    assert own_stage_scores(matrix) == {"a": 0.80, "b": 0.90, "c": 0.85}
    mean = mean_matrix(fft)
    assert [list(r) for r in mean.scores] == [pytest.approx(list(r)) for r in matrix.scores]
    assert mean.base == pytest.approx(matrix.base)
    with pytest.raises(ValueError, match="reference='lora' is not one of"):
        seed_summary({"fft": fft}, reference="lora")
    other = AccuracyMatrix(("a", "b"), ("a",), ((0.5, 0.5),))
    with pytest.raises(ValueError, match="cannot be averaged"):
        mean_matrix([matrix, other])
