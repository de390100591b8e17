"""The report's plots, read back as matplotlib objects: one quantity per axis in pretrain.png, and
difference axes in ap.png whose tick labels read as numbers (an all-zero Δ shows 0, not "1e-17").

Inputs from the real writers: run records from `transfer.record.build_record`/`write_record` (via
tests/test_report_tables.write_trial), pretraining runs from `mocobench.utils.events.MetricsWriter`
with the scalars pretraining logs (MoCo: loss, acc1, moco_m, knn_top1; supervised: loss, acc1,
val_top1).
"""
import matplotlib
import pytest

from tests.test_report_tables import write_trial
from transfer import report

matplotlib.use("Agg")


def tables_of(root, baseline="supervised"):
    runs, _ = report.find_runs([str(root)])
    return report.summarize(runs, baseline)


def tick_labels(ax):
    ax.figure.canvas.draw()
    return [t.get_text() for t in ax.get_yticklabels()]


def assert_plain_numbers(ax):
    labels = tick_labels(ax)
    offset = ax.yaxis.get_offset_text().get_text()
    # matplotlib writes its minus as U+2212
    assert not any(e in text for text in labels + [offset] for e in ("e-", "e\u2212", "e+"))
    assert offset == ""
    assert len(set(labels)) == len(labels)  # no two ticks print alike
    return labels


def test_an_all_zero_difference_axis_reads_zero(tmp_path):
    import matplotlib.pyplot as plt

    # a smoke test: every trial of both inits evaluates to 0 AP, so every Δ is 0 (no CI: no
    # variance); matplotlib's own limits around 0 were +-1e-17 and labelled "1e-17"
    for init in ("supervised", "moco_v2"):
        for seed in range(2):
            write_trial(tmp_path, init, seed, (0.0, 0.0, 0.0))
    tables = tables_of(tmp_path)
    [table] = tables.values()
    assert {d["diff"] for d in table["rows"]["moco_v2"]["deltas"].values()} == {0.0}
    fig = report.ap_figure(tables)
    ax, dax = fig.axes[:2]
    labels = assert_plain_numbers(dax)
    assert "0" in labels
    assert all(text == "0" or text[0] in "+\u2212-" for text in labels)  # differences are signed
    low, high = dax.get_ylim()
    assert low < 0 < high and high - low >= 0.1  # two decimals (every AP < 1): +-0.05 at least
    assert_plain_numbers(ax)
    assert ax.get_ylabel() == "AP (%)" and dax.get_ylabel() == "Δ AP (points)"
    assert ax.get_title() == ("1. synth_voc_trainval detection, R18-FPN, 300 iterations, test on "
                              "synth_voc_test")
    plt.close(fig)


def test_differences_with_intervals_keep_readable_signed_ticks(tmp_path):
    import matplotlib.pyplot as plt

    for seed, values in enumerate([(80.0, 50.0, 55.0), (81.0, 52.0, 56.0), (82.0, 51.0, 60.0)]):
        write_trial(tmp_path, "supervised", seed, values)
        write_trial(tmp_path, "moco_v2", seed, tuple(v + 3.0 for v in values))
    fig = report.ap_figure(tables_of(tmp_path))
    dax = fig.axes[1]
    labels = assert_plain_numbers(dax)
    assert any(text.startswith("+") for text in labels)
    delta = tables_of(tmp_path)[next(iter(tables_of(tmp_path)))]["rows"]["moco_v2"]["deltas"]
    low, high = dax.get_ylim()
    assert low < 0 < high  # the zero line is shown
    assert low <= min(d["low"] for d in delta.values()) \
        and high >= max(d["high"] for d in delta.values())
    plt.close(fig)


def write_pretraining(directory, rows):
    from mocobench.utils.events import MetricsWriter

    directory.mkdir(parents=True)
    writer = MetricsWriter(str(directory))
    for iteration, row in enumerate(rows, 1):
        writer.write(iteration, **row)
    writer.close()


MOCO_ROWS = [dict(epoch=1, loss=6.0, acc1=10.0, moco_m=0.99),
             dict(epoch=2, loss=5.0, acc1=20.0, moco_m=0.99), dict(epoch=2, knn_top1=35.5)]
SUPERVISED_ROWS = [dict(epoch=1, loss=2.0, acc1=30.0), dict(epoch=1, val_top1=28.0),
                   dict(epoch=2, loss=1.5, acc1=40.0), dict(epoch=2, val_top1=33.0)]


def lines_by_axis(fig):
    return [(ax.get_ylabel(), sorted(line.get_label() for line in ax.get_lines()))
            for ax in fig.axes]


def test_pretrain_plot_has_one_quantity_per_axis(tmp_path):
    import matplotlib.pyplot as plt

    write_pretraining(tmp_path / "pretraining" / "run7", MOCO_ROWS)
    write_pretraining(tmp_path / "pretraining" / "supervised", SUPERVISED_ROWS)
    found = report.find_pretrain_runs([str(tmp_path)])
    fig = report.pretrain_figure(found)
    # InfoNCE and cross-entropy (and the two kinds of accuracy) never share an axis
    assert lines_by_axis(fig) == [
        ("InfoNCE loss", ["run7 (MoCo)"]),
        ("instance discrimination acc@1 (%)", ["run7 (MoCo)"]),
        ("kNN top-1 on val (%)", ["run7 (MoCo)"]),
        ("cross-entropy loss", ["supervised"]),
        ("training acc@1 (%)", ["supervised"]),
        ("val top-1 (%)", ["supervised"])]
    assert [ax.get_title() for ax in fig.axes[:1] + fig.axes[3:4]] \
        == ["MoCo: InfoNCE loss", "supervised: cross-entropy loss"]
    assert all(ax.get_xlabel() == "epoch" and ax.get_xlim() == (0.5, 2.5) for ax in fig.axes)
    # the curves are the per-epoch means
    moco_loss = fig.axes[0].get_lines()[0]
    assert list(moco_loss.get_xdata()) == [1, 2] and list(moco_loss.get_ydata()) == [6.0, 5.0]
    assert list(fig.axes[5].get_lines()[0].get_ydata()) == [28.0, 33.0]
    plt.close(fig)


@pytest.mark.parametrize("kind, rows, first", [("moco", MOCO_ROWS, "InfoNCE loss"),
                                                ("supervised", SUPERVISED_ROWS,
                                                 "cross-entropy loss")])
def test_one_kind_of_pretraining_makes_one_row(tmp_path, kind, rows, first):
    import matplotlib.pyplot as plt

    write_pretraining(tmp_path / kind, rows)
    fig = report.pretrain_figure(report.find_pretrain_runs([str(tmp_path)]))
    assert len(fig.axes) == 3 and fig.axes[0].get_ylabel() == first
    plt.close(fig)
    # and the report writes it
    summary = report.write_report([str(tmp_path)], str(tmp_path / "out"))
    assert (tmp_path / "out" / "pretrain.png").stat().st_size > 0 \
        and str(tmp_path / "out" / "pretrain.png") in summary["files"]
