"""`megatron-delta plot-routing` on a metrics.jsonl shaped like the trainer's."""

import json

import numpy as np

from megatron_delta.routing_plot import main, read_routing_history, routing_figure


def _routing(sharpness: float) -> dict:
    """A delta_block-like model: block 0 routes over one source, block 1 over two."""
    routing = {}
    for layer in range(1, 5):
        for sublayer in ("attention", "mlp"):
            weights = [1.0] if layer <= 2 else [1 - sharpness, sharpness]
            routing[f"layer_{layer:02d}.{sublayer}"] = {
                "max_weight": max(weights), "entropy": 0.5, "mean_weight": weights, "num_sources": len(weights),
            }
    return routing


def write_metrics(run_dir, records):
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def test_history_keeps_the_later_line_of_a_repeated_step(tmp_path):
    write_metrics(tmp_path, [
        {"step": 10, "loss": 3.0, "routing": _routing(0.6)},
        {"step": 20, "loss": 2.5, "routing": _routing(0.7)},
        {"step": 20, "val_loss": 2.4, "val_ppl": 11.0},  # no routing: ignored
        {"step": 20, "loss": 2.4, "routing": _routing(0.8)},  # a resumed run logs step 20 again
    ])
    history = read_routing_history(str(tmp_path / "metrics.jsonl"))
    assert list(history) == [10, 20]
    assert history[20]["layer_03.mlp"]["mean_weight"][1] == 0.8


def test_plot_draws_the_logged_values(tmp_path, capsys):
    records = [{"step": step, "loss": 1.0, "routing": _routing(0.5 + step / 100)} for step in range(10, 50, 10)]
    write_metrics(tmp_path, records)
    figure = routing_figure(read_routing_history(str(tmp_path / "metrics.jsonl")))
    heat_ax, curve_ax = figure.axes[:2]
    # Heatmap: the last step's mean weights, one row per sublayer; single-source rows padded with NaN.
    heatmap = np.ma.filled(heat_ax.images[0].get_array(), np.nan)
    expected = np.array([[1.0, np.nan]] * 4 + [[1 - 0.9, 0.9]] * 4)
    np.testing.assert_allclose(heatmap, expected)
    # Curves: max weight over steps of each of the 4 routed sublayers, then their mean (thick line).
    steps = [10, 20, 30, 40]
    lines = [line for line in curve_ax.lines if len(line.get_xdata())]
    assert len(lines) == 5
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), [0.5 + s / 100 for s in steps])  # max(1 - w, w)

    assert main([str(tmp_path)]) == 0
    png = (tmp_path / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4 logged steps, 8 sublayers" in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    write_metrics(tmp_path, [{"step": 1, "loss": 1.0}])  # a standard-variant run has no routing
    assert main([str(tmp_path)]) == 2
    assert "no routing statistics" in capsys.readouterr().err
