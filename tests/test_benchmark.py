"""The side-by-side benchmark: schema, failures recorded, resume after a kill."""

import csv

import pytest

from aecompress.benchmark.results import COLUMNS
from aecompress.cli import main


def run(tiny_lm, out, ratios=("2", "4"), methods=None):
    text = f"{tiny_lm['text']}:all"
    methods = methods or '[{"method": "svd"}, {"method": "quantize"}, {"method": "whitened_svd", "name": "wsvd"}]'
    main(["benchmark", "--model", str(tiny_lm["model"]), "--groups", '[{"modules": ["k_proj", "up_proj"], "name": "kv"}]',
          "--methods", methods, "--ratios", f"[{', '.join(ratios)}]", "--data", f"{text}[:512]",
          "--calibration", f"{text}[-1024:]", "--calibration_window", "64", "--metrics", "[perplexity]",
          "--out_dir", str(out)])


def read(out):
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_schema_table_and_plot(tiny_lm, tmp_path):
    run(tiny_lm, tmp_path)
    with open(tmp_path / "results.csv", newline="") as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS
    rows = read(tmp_path)
    assert rows[0]["method"] == "original"
    jobs = {(r["method"], r["target_ratio"]) for r in rows[1:]}
    assert jobs == {(m, r) for m in ("svd", "quantize", "wsvd") for r in ("2", "4")}
    for r in rows[1:]:
        assert r["metric"] == "perplexity" and float(r["value"]) > 1
        assert float(r["achieved_ratio"]) >= float(r["target_ratio"])
        assert int(r["stored_bytes"]) > 0 and float(r["seconds"]) >= 0
    table = (tmp_path / "results.md").read_text()
    assert table.index("original") < table.index("| kv | svd |")
    assert (tmp_path / "quality_vs_ratio.png").stat().st_size > 0


def test_infeasible_ratio_is_a_failed_row_and_the_run_goes_on(tiny_lm, tmp_path):
    run(tiny_lm, tmp_path, ratios=("2", "100000"), methods='[{"method": "svd"}]')
    rows = read(tmp_path)
    failed = [r for r in rows if r["metric"] == "failed"]
    assert len(failed) == 1 and failed[0]["target_ratio"] == "100000" and "infeasible" in failed[0]["note"]
    assert any(r["metric"] == "perplexity" and r["target_ratio"] == "2" for r in rows)


def test_resume_skips_finished_rows_after_a_kill(tiny_lm, tmp_path, monkeypatch):
    run(tiny_lm, tmp_path, methods='[{"method": "svd"}]')
    before = read(tmp_path)
    # A kill in the middle of writing the last row leaves a cut line behind.
    text = (tmp_path / "results.csv").read_text().splitlines()
    (tmp_path / "results.csv").write_text("\n".join(text[:-1]) + "\n" + text[-1][:10])
    calls = []
    import aecompress.benchmark.run as bench

    real = bench.Benchmark.evaluate
    monkeypatch.setattr(bench.Benchmark, "evaluate", lambda self: calls.append(1) or real(self))
    run(tiny_lm, tmp_path, methods='[{"method": "svd"}]')
    after = [r for r in read(tmp_path) if r["metric"] != "failed"]
    assert len(calls) == 1, "only the job whose row was cut is run again"
    assert {(r["method"], r["target_ratio"]) for r in after} == {(r["method"], r["target_ratio"]) for r in before}


def test_unknown_method_lists_valid_ones(tiny_lm, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(tiny_lm, tmp_path, methods='[{"method": "nonesuch"}]')
    assert exc.value.code != 0
    assert "unknown compression method 'nonesuch'; valid:" in capsys.readouterr().err


def test_table_reads_one_group_at_a_time_and_marks_the_best():
    from aecompress.benchmark.report import markdown
    from aecompress.benchmark.results import Row

    def row(group, method, ratio, value):
        return Row("m", group, method, ratio, ratio, 1, 4, "t", "perplexity", value, 0.0)

    # A resumed run appends a new method after every group's rows.
    rows = [row("a", "svd", 2, 30.0), row("b", "svd", 2, 40.0), row("a", "new", 2, 20.0), row("b", "new", 2, 50.0)]
    table = markdown(rows, "t")
    assert table.index("| a | new |") < table.index("| b | svd |")
    assert "| a | new | **20** |" in table and "| b | svd | **40** |" in table and "| a | svd | 30 |" in table
