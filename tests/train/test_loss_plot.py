"""loss.png is readable: plain-number ticks on its log axis around the final value (matplotlib objects, not pixels)."""


def test_loss_png_log_axis_has_readable_ticks(tmp_path, monkeypatch):
    """The final value of a loss falling from 5.5 to 1.3 can be read off loss.png: plain-number tick labels
    around it (issue 13 item 12), read from the matplotlib objects."""
    import pytest

    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from vermeil.train.metrics import plot_loss_curve

    labels = []
    real = Figure.savefig

    def record(self, *args, **kwargs):
        self.canvas.draw()
        ax = self.axes[0]
        ticks = ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()
        lo, hi = ax.get_ylim()
        labels.extend(t.get_text() for t in ticks if t.get_text() and lo <= t.get_position()[1] <= hi)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    rows = [{"step": s, "loss": 5.5 * 0.9**s + 1.3} for s in range(1, 60)]
    assert plot_loss_curve(rows, tmp_path / "loss.png", ylabel="cross-entropy (nats per byte)")
    values = [float(t.replace("\N{MINUS SIGN}", "-")) for t in labels]  # plain numbers, no 10^k notation
    assert any(1.0 <= v <= 1.5 for v in values) and any(v >= 5 for v in values), labels


def _count_pngs(monkeypatch) -> list[tuple[str, str]]:  # noqa: ANN001
    """Record (y label, title) of every figure saved from now on."""
    from matplotlib.figure import Figure

    drawn: list[tuple[str, str]] = []
    real = Figure.savefig

    def record(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        drawn.append((self.axes[0].get_ylabel(), self.axes[0].get_title()))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return drawn


def test_loss_png_is_drawn_once(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A `LossCurve` hook draws loss.png and the trainer draws none of its own (it drew an unlabelled one first,
    which the recipes' hook then redrew); without such a hook the trainer's default curve is drawn, once."""
    import pytest

    pytest.importorskip("matplotlib")
    from test_trainer import _trainer  # the tests folder is on sys.path

    from vermeil.recipes.build import LossCurve  # the recipes' labelled curve (vermeil.train.LossCurve)

    drawn = _count_pngs(monkeypatch)
    _trainer(
        tmp_path / "a", hooks=[LossCurve("cross-entropy (nats per byte)", "tiny")], steps=2, plot=True
    ).fit()
    assert drawn == [("cross-entropy (nats per byte)", "tiny")]
    assert (tmp_path / "a" / "loss.png").is_file()
    drawn.clear()
    _trainer(tmp_path / "b", steps=2, plot=True).fit()
    assert drawn == [("loss (nats per token)", "")] and (tmp_path / "b" / "loss.png").is_file()
    drawn.clear()
    _trainer(tmp_path / "c", steps=2, plot=False).fit()
    assert drawn == [] and not (tmp_path / "c" / "loss.png").exists()


def test_loss_png_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys) -> None:  # noqa: ANN001
    import sys

    from test_trainer import _trainer

    from vermeil.recipes.build import LossCurve  # the recipes' labelled curve (vermeil.train.LossCurve)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    _trainer(tmp_path, hooks=[LossCurve("y")], steps=2, plot=True).fit()
    err = capsys.readouterr().err
    assert err.count("loss.png not written (pip install matplotlib to get the loss curve)") == 1, err
    assert not (tmp_path / "loss.png").exists()
