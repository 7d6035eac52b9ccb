from experiments.ablate_digits import main


def test_ablation_script_runs_end_to_end(tmp_path):
    table = main(["--steps", "2", "--per-class", "1", "--sample-steps", "2", "--results-dir", str(tmp_path)])
    assert (tmp_path / "table.md").read_text().strip() == table
    rows = table.splitlines()[2:]
    assert len(rows) == 3 and rows[0].startswith("| dense DiT") and "| - | -" in rows[0]
    # Matched activated parameters: the three rows show the same "active" column.
    assert len({row.split("|")[3] for row in rows}) == 1
