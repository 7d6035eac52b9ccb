import json

from experiments.routing_study import main, steps_to, table


def test_routing_study_runs_end_to_end(tmp_path):
    """Two steps, one seed, a router whose experts per token vary: the table, the figure and the
    numbers are written; a second study with the same settings reads the run's saved result."""
    argv = ["--steps", "2", "--log-every", "1", "--seeds", "0", "--routings", "race",
            "--samples-per-class", "1", "--sample-steps", "2", "--results-dir", str(tmp_path)]  # fmt: skip
    text = main(argv)
    assert main(argv) == text
    assert len(list((tmp_path / "race" / "seed0").glob("[0-9][0-9][0-9]-*"))) == 1
    assert (tmp_path / "routing_study.md").read_text().strip() == text
    assert (tmp_path / "routing_study.png").stat().st_size > 0
    assert [row.split(" | ")[0] for row in text.splitlines()[4:]] == ["| Expert Race"]
    runs = json.loads((tmp_path / "routing_study.json").read_text())
    race = runs["race"]["0"]
    assert len(race["experts_by_step"]) == 2 and len(race["experts_by_position"]) == 16 and len(race["curve"]) == 2


def _run(losses, experts=None):
    run = {"curve": [(25 * (i + 1), loss) for i, loss in enumerate(losses)], "accuracy": 1.0, "frechet_distance": 5.0}
    run["final_loss"] = sum(losses[-5:]) / len(losses[-5:])
    if experts is not None:
        run["experts_by_step"] = experts
    return run


def test_the_table_reports_the_spread_over_seeds_and_the_steps_to_the_dense_loss():
    runs = {
        "dense": {0: _run([1.0] * 10), 1: _run([1.0] * 10)},
        "tc": {0: _run([2.0] * 5 + [0.5] * 5, [2.0, 2.0]), 1: _run([2.0] * 6 + [0.5] * 4, [2.0, 2.0])},
        "race": {0: _run([2.0] * 10, [1.5, 2.5])},
    }
    rows = table(runs, 250, [0, 1]).splitlines()[4:]
    assert rows[0].startswith("| dense DiT (MLP x15) | 1.0000 ± 0.0000 |") and rows[0].endswith("| - (dense) |")
    assert rows[1].split(" | ")[2] == "238 ± 18"  # the running mean of 5 first reaches 1.0 at steps 225 and 250
    assert rows[1].endswith("| 2.00 ± 0.00 (2.00-2.00) |") and rows[2].endswith("| 2.00 (1.50-2.50) |")
    assert rows[2].split(" | ")[2] == "-"  # never reaches the dense loss
    assert steps_to(runs["tc"][0]["curve"], 1.0) == 225
