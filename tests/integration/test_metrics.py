"""The metrics log read back: `fax metrics` compares runs and plots their curves."""

import json

import numpy as np
import pytest

from fax.cli import main
from fax.metrics import plot_runs, read_metrics


def record(step, loss, tokens_per_s, mfu, lr=1e-3, **extra):
    return {"step": step, "loss": loss, "grad_norm": 1.0, "lr": lr, "tokens_per_s": tokens_per_s,
            "step_time_s": 0.1, "mfu": mfu, **extra}


def write_log(run_dir, records, tail=""):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


@pytest.fixture
def runs(tmp_path):
    a = write_log(tmp_path / "a", [record(2, 5.0, 100.0, 0.01), record(4, 2.5, 900.0, 0.03, val_loss=3.25),
                                   record(6, 3.0, 1100.0, 0.05, val_loss=3.5)])
    b = write_log(tmp_path / "longer-run-name", [record(10, 4.0, 2000.0, 0.1, lr=2e-3)])
    return a, b


def test_summary_compares_runs(runs, tmp_path, capsys):
    a, b = runs
    empty = write_log(tmp_path / "empty", [])
    assert main(["metrics", str(a), str(b), str(empty)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "step", "loss", "first", "->", "last", "best", "(step)", "val_loss", "best",
                              "(step)", "tokens/s", "mfu"]
    # the last step; loss first -> last; best loss and its step; last and best val_loss; median tokens/s and MFU
    assert rows[0].split() == [str(a), "6", "5.0000", "->", "3.0000", "2.5000", "(4)", "3.5000", "3.2500", "(4)",
                               "900", "3.00%"]
    assert rows[1].split() == [str(b), "10", "4.0000", "->", "4.0000", "4.0000", "(10)", "-", "-", "2,000", "10.00%"]
    assert rows[2].split() == [str(empty), "-", "no", "steps", "logged", "yet"]
    assert len({row.index(" -> ") for row in [rows[0], rows[1]]}) == 1  # columns line up


def test_a_record_cut_short_is_left_out(tmp_path, capsys):
    """A process killed while writing a record leaves it without its newline: reading (and so
    resuming) goes on without it. A broken record before the last is an error that says where."""
    cut = write_log(tmp_path / "cut", [record(1, 5.0, 10.0, 0.1), record(2, 4.0, 10.0, 0.1)],
                    tail='{"step": 3, "loss": 3.')
    assert [r["step"] for r in read_metrics(cut / "metrics.jsonl")] == [1, 2]
    broken = write_log(tmp_path / "broken", [record(1, 5.0, 10.0, 0.1)])
    with (broken / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo\n' + json.dumps(record(3, 4.0, 10.0, 0.1)) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics record"):
        read_metrics(broken / "metrics.jsonl")
    assert main(["metrics", str(broken)]) == 2
    assert "metrics.jsonl:2 is not a metrics record" in capsys.readouterr().err


def test_metrics_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["metrics", str(tmp_path)]) == 2
    assert f"{str(tmp_path)!r} has no metrics.jsonl: not a run directory" in capsys.readouterr().err


def test_plot_draws_every_logged_value(runs, tmp_path):
    a, b = runs
    out = tmp_path / "curves.png"
    fig = plot_runs({"a": read_metrics(a / "metrics.jsonl"), "b": read_metrics(b / "metrics.jsonl")}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loss, speed, mfu, lr = fig.axes
    drawn = lambda ax: [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))  # noqa: E731
                        for line in ax.get_lines()]
    assert drawn(loss) == [("a", [2, 4, 6], [5.0, 2.5, 3.0]), (drawn(loss)[1][0], [4, 6], [3.25, 3.5]),
                           ("b", [10], [4.0])]
    assert drawn(loss)[1][0].startswith("_")  # the val_loss line: dashed, no legend entry of its own
    assert loss.get_lines()[1].get_linestyle() == "--"
    assert loss.get_lines()[1].get_color() == loss.get_lines()[0].get_color()
    assert drawn(speed) == [("a", [2, 4, 6], [100.0, 900.0, 1100.0]), ("b", [10], [2000.0])]
    assert drawn(mfu) == [("a", [2, 4, 6], [0.01, 0.03, 0.05]), ("b", [10], [0.1])]
    np.testing.assert_allclose(drawn(lr)[1][2], [2e-3])
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["a", "b"]


def test_fax_metrics_plots_a_real_run(runs, tmp_path, small_corpus, capsys):
    from fax.train.loop import Trainer

    trained = tmp_path / "trained"
    Trainer(overrides=["model=gpt-tiny", f"data.path={small_corpus}", "train.steps=4", "train.batch_size=8",
                       "train.seq_len=32", "train.log_every=2", "train.sample_tokens=0", f"run_dir={trained}"],
            echo=lambda _: None).fit()
    out = tmp_path / "runs.svg"
    assert main(["metrics", str(trained), str(runs[0]), "--plot", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed[1:3]] == [[str(trained), "4"], [str(runs[0]), "6"]]
    assert printed[-1] == f"wrote {out}"
    assert out.read_text().lstrip().startswith("<?xml") and "</svg>" in out.read_text()
