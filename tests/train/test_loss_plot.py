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
