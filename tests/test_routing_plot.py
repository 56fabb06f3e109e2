"""`megatron-delta plot-routing` on a metrics.jsonl shaped like the trainer's."""

import json

from megatron_delta.routing_plot import main, read_routing_history


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


def test_plot_writes_a_png(tmp_path, capsys):
    write_metrics(tmp_path, [{"step": step, "loss": 1.0, "routing": _routing(0.5 + step / 100)}
                             for step in range(10, 50, 10)])
    assert main([str(tmp_path)]) == 0
    png = (tmp_path / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # two panels with text, not an empty canvas
    assert "4 logged steps, 8 sublayers" in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    write_metrics(tmp_path, [{"step": 1, "loss": 1.0}])  # a standard-variant run has no routing
    assert main([str(tmp_path)]) == 2
    assert "no routing statistics" in capsys.readouterr().err
