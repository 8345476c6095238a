"""The PNGs the tools write (train-mara's learning curve, sweep's reward plot) come out
whatever matplotlib backend the caller runs, and leave that backend and pyplot alone."""

import csv

import pytest


@pytest.fixture
def svg_backend():
    """A caller on another backend than Agg (as a notebook or a GUI is)."""
    import matplotlib

    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    yield
    matplotlib.use(previous)


def _check_png_and_untouched(path):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    assert matplotlib.get_backend() == "svg"
    assert plt.get_fignums() == []
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    image = imread(path)
    # Not a blank canvas: curves, labels and legends make many distinct colours.
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::7].tolist()}) > 20


def test_learning_curve(svg_backend, tmp_path):
    from vllm_align.train.metrics import plot_curve

    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["episodes", "reward", "kl"])
        writer.writeheader()
        writer.writerows({"episodes": 8 * i, "reward": 0.1 * i, "kl": "" if i == 3 else 0.01 * i}
                         for i in range(1, 12))
    png = plot_curve(path, tmp_path / "curve.png", baselines={"untrained (0.3)": 0.3})
    _check_png_and_untouched(png)


def test_sweep_plot(svg_backend, tmp_path):
    from vllm_align.data.sweep import GridPoint, SweepRow, plot_sweep

    rows = [SweepRow(GridPoint("dera", lam), 4, 0.1 + lam / 10, 0.02) for lam in (0, 0.5, 1, 2)]
    rows += [SweepRow(GridPoint("aad", alpha), 4, 0.3 - alpha, 0.01) for alpha in (0.1, 0.2)]
    plot_sweep(rows, tmp_path / "sweep.png", title="toy")
    _check_png_and_untouched(tmp_path / "sweep.png")
