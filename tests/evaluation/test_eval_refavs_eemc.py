"""
eval.py on EEMC (`--dataset refavs` with an EEMC checkpoint): the original's batches (4 expressions of one split in
metadata.csv order) formed before sharding, so that one and two processes agree under `release`, where a result
depends on its batch; under `fixed` the batch size changes nothing.
"""

import json

import pytest

from oisa_cli.main import main as oisa_main
from oisa_evaluation.refavs_eemc import expression_batches, limited_batches
from oisa_evaluation.runner import load_tasks
from processing_oisa.data.synthetic import make_synthetic_dataset

from .test_eval import SMALL, metrics, result_lines, run_eval, run_eval_two_processes


@pytest.fixture(scope="module")
def eemc_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eemc") / "tiny"
    assert oisa_main(["tiny-random", "--family", "refavs", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def refavs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refavs") / "data"
    # 6 seen, 6 unseen and 2 null expressions
    make_synthetic_dataset(root, "refavs", num_videos=2, seed=0, **SMALL)
    return root


@pytest.fixture(scope="module")
def release_run(tmp_path_factory, eemc_dir, refavs_root):
    out = tmp_path_factory.mktemp("release-run")
    run_eval("--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root, "--out", out)
    return out


def lines_by_key(out) -> dict[str, dict]:
    return {line["key"]: line for line in result_lines(out)}


def test_batches_are_the_originals(refavs_root):
    tasks = load_tasks("refavs", refavs_root, ["test_s", "test_u", "test_n"])
    batches = expression_batches(tasks.tasks, 4)
    # per split, in CSV order, 4 at a time: no batch crosses a split
    assert [[task.record.row for task in batch] for batch in batches] == [
        [0, 1, 2, 3], [4, 5], [8, 9, 10, 11], [12, 13], [6, 7]]
    limited, kept = limited_batches(tasks, 4, limit=5)
    assert [task.record.row for task in limited.tasks] == [0, 1, 2, 3, 4]
    # the last batch keeps the row past the limit: the limit cuts the results, not the batch
    assert [[task.record.row for task in batch] for batch in kept] == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.slow
def test_release_one_and_two_processes_agree(tmp_path, eemc_dir, refavs_root, release_run):
    single = metrics(release_run)
    assert (single["num_expressions"], single["num_scored"], single["num_errors"]) == (14, 14, 0)
    assert single["run"]["batch_size"] == 4 and single["run"]["behaviour"]["integration_attention_over"] == "batch"
    for mode in ("official", "per_expression"):
        assert set(single[mode]) >= {"Seen", "Unseen", "Mix", "Null"}
    table = (release_run / "results.md").read_text()
    assert table.startswith("| Model | Mode | Seen J | Seen F | Unseen J | Unseen F | Mix J | Mix F | Null S |")
    assert "| tiny (release) | official |" in table
    assert "Predictions: EEMC: batches of 4 expressions of one split, in the order of metadata.csv" in table
    assert "GT masks resized to 256x256 as the original" in table
    assert lines_by_key(release_run)["test_s/row5"]["batch_rows"] == [4, 5]

    run_eval_two_processes("--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root, "--out", tmp_path)
    written = {path.name: len(path.read_text().splitlines()) for path in tmp_path.glob("results-*.jsonl")}
    # whole batches to each process: of the batches of 4, 2, 4, 2 and 2 expressions, the first, third and fifth to one
    assert written == {"results-000.jsonl": 10, "results-001.jsonl": 4}
    assert metrics(tmp_path) == single
    assert (tmp_path / "results.md").read_text() == table


@pytest.mark.slow
def test_the_batch_changes_release_results_and_not_fixed_ones(tmp_path, eemc_dir, refavs_root, release_run):
    common = ["--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root]
    run_eval(*common, "--out", tmp_path / "release1", "--batch-size", "1")
    release_4, release_1 = lines_by_key(release_run), lines_by_key(tmp_path / "release1")
    assert any(release_4[key]["stats"] != release_1[key]["stats"] for key in release_4)
    assert metrics(tmp_path / "release1")["run"]["batch_size"] == 1

    for batch_size in ("1", "3"):
        run_eval(*common, "--out", tmp_path / f"fixed{batch_size}", "--profile", "fixed", "--batch-size", batch_size)
    fixed_1, fixed_3 = lines_by_key(tmp_path / "fixed1"), lines_by_key(tmp_path / "fixed3")
    assert fixed_3["test_s/row2"]["batch_rows"] == [0, 1, 2] and fixed_1["test_s/row2"]["batch_rows"] == [2]
    assert all(fixed_1[key]["stats"] == fixed_3[key]["stats"] for key in fixed_1)
    expected = {key: value for key, value in metrics(tmp_path / "fixed1").items() if key != "run"}
    assert {key: value for key, value in metrics(tmp_path / "fixed3").items() if key != "run"} == expected
    assert "a video's result does not depend on its batch" in metrics(tmp_path / "fixed3")["run"]["inference"]


def test_a_limited_run_keeps_its_batches_and_resumes(tmp_path, eemc_dir, refavs_root, release_run):
    common = ["--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root, "--out", tmp_path]
    run_eval(*common, "--limit", "5")
    limited = lines_by_key(tmp_path)
    assert sorted(limited) == [f"test_s/row{row}" for row in range(5)]
    # row 4 ran in its full-run batch, with row 5 past the limit
    full_run_line = lines_by_key(release_run)["test_s/row4"]
    assert limited["test_s/row4"] == {**full_run_line, "seconds": limited["test_s/row4"]["seconds"]}
    run_eval(*common)
    assert metrics(tmp_path) == metrics(release_run)


def test_eemc_evaluates_on_refavs_only(tmp_path, eemc_dir, refavs_root, caplog):
    run_eval("--model", eemc_dir, "--dataset", "omniavs", "--data-root", refavs_root, "--out", tmp_path, status=2)
    assert "EEMC, the Ref-AVS baseline, evaluates on --dataset refavs only" in caplog.text
    assert not tmp_path.joinpath("run.json").exists()


def test_the_run_file_records_the_batch_size(tmp_path, eemc_dir, refavs_root, release_run):
    with pytest.raises(ValueError, match="come from another run"):
        run_eval("--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root, "--out", release_run,
                 "--batch-size", "2")
    recorded = json.loads((release_run / "run.json").read_text())
    assert recorded["batch_size"] == 4


def test_the_card_of_an_eemc_run_comes_from_the_eemc_template(tmp_path, eemc_dir, refavs_root):
    run_eval(
        "--model", eemc_dir, "--dataset", "refavs", "--data-root", refavs_root, "--out", tmp_path / "out",
        "--limit", "2", "--card", tmp_path / "card",
    )
    card = (tmp_path / "card" / "README.md").read_text()
    assert "EEMC (\"Expression Enhancing with Multimodal Cues\")" in card and "- eemc" in card
