"""The evidence scripts under benchmarks/ run end to end at toy size and report what they claim to."""
import json

import pytest



def test_fashionsynth_reports_variants_diagnostics_and_merges(tmp_path, one_thread, monkeypatch, load_benchmark):
    bench = load_benchmark("fashionsynth")
    measured = []  # what selection_hit_rate returned for the trained model: the row must report it
    real_hit_rate = bench.selection_hit_rate
    monkeypatch.setattr(bench, "selection_hit_rate", lambda *a, **k: measured.append(real_hit_rate(*a, **k))
                        or measured[-1])
    common = ["--products", "70", "--val-products", "20", "--steps", "2", "--pretrain-steps", "2", "--seeds", "0"]
    bench.main(["--out", str(tmp_path / "a"), "--variants", "clip-ft", "e2-without-season", *common])
    bench.main(["--out", str(tmp_path / "b"), "--variants", "clip-ft", "--batch-sizes", "16", *common])
    report = (tmp_path / "a" / "results.md").read_text()
    assert "| clip-ft | 1 |" in report and "| e2-without-season | 1 |" in report
    # Selection diagnostics only for the wrapped model, and only for the entities it has.
    diagnostics = report.split("Selection diagnostics")[1].split("during training")[0]
    assert "hit brand f0" in diagnostics and "hit season" not in diagnostics and "clip-ft" not in diagnostics
    rows = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]
    (rates,) = measured  # one wrapped run
    row = rows["e2-without-season"][0]
    assert row["hit brand f0"] == pytest.approx(100 * rates["brand"][0])
    assert row["hit brand f1"] == pytest.approx(100 * rates["brand"][1])
    assert row["hit brand chance"] == pytest.approx(100 * rates["brand"]["chance"])
    assert 0 < row["hit brand chance"] < 100  # the logo covers some patches, not all

    bench.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m" / "results.json").read_text())["runs"]
    assert sorted(merged) == ["clip-ft", "clip-ft (batch 16)", "e2-without-season"]
    assert "| clip-ft (batch 16) | " in (tmp_path / "m" / "results.md").read_text().split("during training")[1]


def test_entity_ceiling_reports_accuracy_and_chance(tmp_path, one_thread, capsys, load_benchmark):
    bench = load_benchmark("entity_ceiling")
    base_out = tmp_path / "bench"
    bench.main(["--out", str(base_out), "--entities", "season", "--steps", "2", "--pretrain-steps", "2"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["entity"] == "season" and abs(row["chance"] - 100 / 6) < 1e-6
    # an accuracy over the validation products: a whole number of them right
    n_val = json.loads((base_out / "setting.json").read_text())["data"]["val_products"]
    right = row["val_accuracy"] * n_val / 100
    assert right == pytest.approx(round(right), abs=1e-3)  # (a float32 mean)
    bench.main(["--table", str(base_out)])  # the calibration table reads what the run kept on disk
    table_row = capsys.readouterr().out.strip().splitlines()[-1]
    assert table_row.startswith("| bench | demo | 2000 | 24 / 6 | 1, 1 | - | "
                                f"{row['val_accuracy']:.1f} (chance 16.7) |")


def test_step_time_compares_against_clip_ft_in_the_same_run(tmp_path, one_thread, capsys, load_benchmark):
    bench = load_benchmark("step_time")
    bench.main(["--model", "tiny", "--batch", "4", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| clip-ft |" in out and "| clip-ft-tags |" in out and "| e2 |" in out
    assert out.count("| clip-ft | ") == 1  # the baseline once, even when it is also asked for


def test_composed_retrieval_aggregates_runs_as_mean_and_std(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("composed_retrieval")

    def run(r10):
        report = {"brand": {"R@10": r10, "R@50": 100.0}, "average": {"R@10": r10, "R@50": 100.0}}
        return {"A": {"cirevl": report}, "B": {"cirevl": report}}

    paths = []
    for i, r10 in enumerate((40.0, 60.0)):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(run(r10)))
    bench.main(["--aggregate", *map(str, paths)])
    out = capsys.readouterr().out
    assert "over 2 runs" in out
    assert "| brand | 50.0 ± 14.1 | 100.0 ± 0.0 | 50.0 ± 14.1 | 100.0 ± 0.0 |" in out


def test_captioning_aggregate_pools_rows_of_runs_by_captioner_and_encoder(tmp_path, capsys, load_benchmark):
    bench = load_benchmark("captioning")

    def row(encoder, seed, bleu4, brand):
        return {"encoder": encoder, "captioner": "capdec", "seed": seed,
                "captions": {"BLEU@4": bleu4}, "entities": {"brand": brand}}

    paths = []
    for seed, (a, b) in enumerate(((0.30, 0.40), (0.50, 0.60))):  # one file per encoder seed
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps({"rows": [row("A", seed, a, 0.1), row("B", seed, b, 0.2)]}))
    bench.main(["--aggregate", *map(str, paths)])
    out = capsys.readouterr().out
    assert "over seeds [0, 1]" in out
    assert "| capdec | A | n/a | 40.0 ± 14.1 |" in out and "| capdec | B | n/a | 50.0 ± 14.1 |" in out


def test_fashionsynth_resumes_finished_runs_and_refuses_another_setting(tmp_path, one_thread, capsys, load_benchmark):
    bench = load_benchmark("fashionsynth")
    common = ["--out", str(tmp_path), "--products", "70", "--val-products", "12", "--steps", "2",
              "--pretrain-steps", "1", "--variants", "clip-ft"]
    bench.main([*common, "--seeds", "0"])
    capsys.readouterr()
    record = (tmp_path / "setting.json").stat()
    bench.main([*common, "--seeds", "0", "1"])  # seed 0 is done: only seed 1 trains
    # The record is not rewritten by later runs: parallel runs sharing a --prepared folder read it.
    assert (tmp_path / "setting.json").stat().st_mtime_ns == record.st_mtime_ns
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["seed"] for r in printed] == [1]
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]["clip-ft"]) == 2
    with pytest.raises(SystemExit, match="another setting.*logo_scale|differs in \\['data'\\]"):
        bench.main([*common, "--seeds", "0", "--logo-scale", "2"])
    # A folder prepared before a data field existed reads as that field's default (what it drew).
    record = json.loads((tmp_path / "setting.json").read_text())
    del record["data"]["keep_apart"]
    (tmp_path / "setting.json").write_text(json.dumps(record))
    bench.main([*common, "--seeds", "0"])
    with pytest.raises(SystemExit, match="another setting"):
        bench.main([*common, "--seeds", "0", "--keep-apart"])
