"""The merge-quality benchmark: task data (correct answers, disjoint splits, seeds), its merge table, its CI check."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sgtv_jax.pipeline.config import parse_config

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("merge_quality", ROOT / "examples/merge_quality.py")
mq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mq)
D = mq.D


def _prompts(parts):
    return [{r["prompt"] for r in p} for p in parts]


def test_addition_answers_are_the_sums_digits_reversed_and_splits_disjoint():
    parts = D.addition((400, 64, 64))
    assert [len(p) for p in parts] == [400, 64, 64]
    for p in parts:
        for r in p:
            a, b = r["prompt"].removesuffix("=").split("+")
            assert int(r["answer"][::-1]) == int(a) + int(b)
    assert {"prompt": "99+99=", "answer": "891"} in [r for p in D.addition((8100,)) for r in p]
    prompts = _prompts(parts)
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_reversal_answers_and_disjoint_splits():
    parts = D.reversal((400, 64, 64))
    for p in parts:
        for r in p:
            word = r["prompt"][len("Reverse: ") : -len(" ->")]
            assert r["answer"].split() == word.split()[::-1]
    prompts = _prompts(parts)
    assert [len(s) for s in prompts] == [400, 64, 64]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_code_splits_are_disjoint_and_fixed_by_the_seed():
    parts = D.code_snippets((200, 48, 48))
    sets = [set(p) for p in parts]
    assert [len(s) for s in sets] == [200, 48, 48]
    assert not (sets[0] & sets[2] or sets[1] & sets[2] or sets[0] & sets[1])
    assert D.code_snippets((200, 48, 48)) == parts


def test_seeds_draw_other_disjoint_splits_with_200_eval_items():
    a, b = D.task_data(0), D.task_data(1)
    for t in D.TASKS:
        assert len(a[t][2]) >= 200 and len(b[t][2]) >= 200
        assert a[t][2] != b[t][2]  # another evaluation set
        sets = [{str(x) for x in part} for part in a[t]]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), t
    # every sum is used: the two seeds split the same 8100 sums
    assert sorted(str(x) for p in a["add"] for x in p) == sorted(str(x) for p in b["add"] for x in p)
    assert D.task_data(0) == a


def test_every_merge_row_is_a_valid_config(tmp_path):
    fts = {t: tmp_path / f"ft_{t}" for t in D.TASKS}
    rows = mq.all_merges()
    assert set(mq.select(None, quick=True)) <= set(rows)
    assert "recommended" in mq.select(None, quick=True)
    for label, row in rows.items():
        cfg = mq.config_for(row, fts, tmp_path / "base", tmp_path, 16, 64)
        assert parse_config(cfg).merge_method == row["merge_method"], label
        if row.get("calib") == "per_task":
            assert [m["calibration"]["data"] for m in cfg["models"]] == [
                str(tmp_path / f"calib_{t}.txt") for t in D.TASKS
            ]


@pytest.mark.parametrize("name", ["recommended", "recommended sparse"])
def test_recommended_row_is_the_shipped_yaml_method(name):
    path = mq.RECOMMENDED_YAML if name == "recommended" else mq.RECOMMENDED_SPARSE_YAML
    shipped = yaml.safe_load(path.read_text())
    row = mq.all_merges()[name]
    assert row["merge_method"] == shipped["merge_method"]
    assert all(row[k] == v for k, v in shipped.items() if k not in ("models", "base_model", "calibration"))


def test_only_names_the_merges_and_rejects_an_unknown_one(capsys):
    assert list(mq.select(["wudi (data-free)", "recommended"], quick=True)) == ["wudi (data-free)", "recommended"]
    with pytest.raises(SystemExit) as e:
        mq.main(["--only", "nope", "--list"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --only: no merge named 'nope' (see --list)"


def _rows(shares, spec=(0.95, 0.9)):
    """A results table as `gather` makes it: the recommended merge's shares over seeds."""
    return {
        "specialist add": {"add": [spec[0]] * len(shares)},
        "specialist rev": {"rev": [spec[1]] * len(shares)},
        "recommended": {
            "add": [s[0] * spec[0] for s in shares],
            "rev": [s[1] * spec[1] for s in shares],
            **{f"{t}_share": [s[i] for s in shares] for i, t in enumerate(D.TASKS)},
        },
    }


def test_a_fine_tune_made_anew_with_another_recipe_is_merged_anew(tmp_path):
    fts = {t: tmp_path / f"ft_{t}" for t in D.TASKS}
    for t, f in fts.items():
        f.mkdir()
        (f / D.RECIPE_STAMP).write_text(json.dumps({**D.RECIPES[t], "seed": 0}) + "\n")
    cfg = {"merge_method": "ties", "models": [str(f) for f in fts.values()]}
    before = mq.merge_dir(tmp_path, "ties d=0.1", cfg, 32, 64, fts)
    assert before == mq.merge_dir(tmp_path, "ties d=0.1", cfg, 32, 64, fts)  # cached: the same folder
    (fts["add"] / D.RECIPE_STAMP).write_text(json.dumps({**D.RECIPES["add"], "steps": 1, "seed": 0}) + "\n")
    assert mq.merge_dir(tmp_path, "ties d=0.1", cfg, 32, 64, fts) != before


def test_baseline_records_mean_and_spread_and_fails_below_it(tmp_path):
    args = argparse.Namespace(nsamples=16, seqlen=64, steps=None, seeds=[0, 1, 2])
    dst = tmp_path / "baseline.json"
    rec = mq.record_baseline(_rows([(0.9, 1.0, 0.8), (0.8, 1.0, 0.9), (0.85, 1.0, 0.85)]), args, dst)
    assert json.loads(dst.read_text()) == json.loads(json.dumps(rec))
    assert rec["shares"] == {"add": 0.85, "rev": 1.0, "code": 0.85}
    # spread: the seeds' range; rev's range is 0, so its floor, 2 binomial standard errors at
    # 200 items: 2 * sqrt(0.9 * 0.1 / 200) / 0.9 (p = 0.9 x 1.0 over a specialist of 0.9)
    assert rec["spread"]["add"] == pytest.approx(0.1) and rec["spread"]["code"] == pytest.approx(0.1)
    assert rec["spread"]["rev"] == pytest.approx(2 * (0.09 / 200) ** 0.5 / 0.9, abs=1e-4)
    one = argparse.Namespace(**{**vars(args), "seeds": [0]})
    assert mq.check_baseline(_rows([(0.76, 0.96, 0.76)]), one, dst) == []
    fails = mq.check_baseline(_rows([(0.74, 0.9, 0.76)]), one, dst)
    assert len(fails) == 2 and "add specialist" in fails[0] and "rev specialist" in fails[1]
    assert (
        "recorded with"
        in mq.check_baseline(_rows([(1, 1, 1)]), argparse.Namespace(**{**vars(one), "nsamples": 32}), dst)[0]
    )
    rec["recipe"]["merge_method"] = "ties"
    dst.write_text(json.dumps(rec))
    assert "another recipe" in mq.check_baseline(_rows([(1, 1, 1)]), one, dst)[0]


def test_baseline_keeps_one_run_per_machine_kind_and_spans_them(tmp_path, monkeypatch):
    """Another CPU gives the same seed other fine-tunes: the spread covers every machine kind's run."""
    args = argparse.Namespace(nsamples=16, seqlen=64, steps=None, seeds=[0])
    dst = tmp_path / "baseline.json"
    monkeypatch.setattr(mq, "machine", lambda: "cpu A")
    mq.record_baseline(_rows([(0.95, 1.0, 1.05)]), args, dst)
    monkeypatch.setattr(mq, "machine", lambda: "cpu B")
    mq.record_baseline(_rows([(0.99, 1.0, 1.0)]), args, dst)  # B's first run, replaced below
    rec = mq.record_baseline(_rows([(0.88, 1.0, 1.01)]), args, dst)
    assert [r["machine"] for r in rec["runs"]] == ["cpu A", "cpu B"]
    assert rec["shares"]["add"] == pytest.approx(0.915) and rec["spread"]["add"] == pytest.approx(0.07)
    assert rec["spread"]["code"] == pytest.approx(0.04)
    assert mq.check_baseline(_rows([(0.85, 1.0, 1.0)]), args, dst) == []  # 0.915 - 0.07 = 0.845
    assert "add specialist" in mq.check_baseline(_rows([(0.84, 1.0, 1.0)]), args, dst)[0]
    other = argparse.Namespace(**{**vars(args), "nsamples": 32})  # other settings: A's run is dropped
    assert [r["machine"] for r in mq.record_baseline(_rows([(0.9, 1.0, 1.0)]), other, dst)["runs"]] == ["cpu B"]


def test_quick_run_records_then_checks_its_baseline_on_a_tiny_family(tmp_path, monkeypatch):
    """The whole script (`main`) on tiny random llamas standing in for SmolLM2 and its fine-tunes."""
    from tests.helpers import tiny_models as H

    fam = H.make_family(tmp_path / "fam", "llama", tasks=3, layers=2)
    monkeypatch.setattr(mq, "fetch_smollm2", lambda: fam["base"])
    monkeypatch.setattr(D, "finetunes", lambda base, tok, folder, data, seed, steps: dict(zip(D.TASKS, fam["fts"])))
    work, base_json = tmp_path / "work", tmp_path / "baseline.json"
    common = ["--quick", "--work", str(work), "--baseline", str(base_json), "--nsamples", "2", "--seqlen", "16"]
    assert mq.main([*common, "--only", "recommended", "task_arithmetic (sum)", "--record-baseline"]) == 0
    rec = json.loads(base_json.read_text())
    res = json.loads((work / "results.json").read_text())
    assert res["seeds"] == [0] and list(res["rows"]) == [
        "base",
        "specialist add",
        "specialist rev",
        "specialist code",
        "recommended",
        "task_arithmetic (sum)",
    ]
    assert rec["shares"]["code"] == pytest.approx(res["rows"]["recommended"]["code_share"][0], abs=1e-4)
    assert mq.main([*common, "--only", "recommended"]) == 0  # the same (cached) merge keeps its shares
    rec["shares"]["code"] += 2 * rec["spread"]["code"] + 1e-3
    base_json.write_text(json.dumps(rec))
    assert mq.main([*common, "--only", "recommended"]) == 1


@pytest.mark.skipif(
    not os.environ.get("SGTV_MERGE_QUALITY"),
    reason="fine-tunes SmolLM2 (or reuses $SGTV_MERGE_QUALITY_WORK): set SGTV_MERGE_QUALITY=1",
)
def test_quick_run_keeps_the_recommended_recipes_recorded_shares(tmp_path):
    work = os.environ.get("SGTV_MERGE_QUALITY_WORK") or str(tmp_path)
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples/merge_quality.py"), "--quick", "--work", work],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ok: the recommended recipe keeps its recorded shares" in run.stdout


def test_scores_are_cached_by_weights_and_evaluation_set(tmp_path, monkeypatch):
    calls = []

    def fake_match(model, tok, recs, batch_size):
        calls.append(model)
        return (len(recs) / 10, [])

    monkeypatch.setattr(mq, "load_model", lambda path: (path, None))
    monkeypatch.setattr(mq, "forced_exact_match", fake_match)
    monkeypatch.setattr(mq, "perplexity", lambda model, tok, text, seqlen, batch_size: float(len(text)))
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"1")
    ev = {"add": [{"prompt": "1+1=", "answer": "2"}], "rev": [], "code": "abc"}
    cache = tmp_path / "scores.json"
    first = mq.score(model, ev, cache)
    assert first == {"add": 0.1, "rev": 0.0, "code": 3.0} and len(calls) == 2
    assert mq.score(model, ev, cache) == first and len(calls) == 2  # from the cache
    assert mq.score(model, {**ev, "code": "abcd"}, cache)["code"] == 4.0 and len(calls) == 4  # other items
    (model / "model.safetensors").write_bytes(b"22")  # the model written anew
    mq.score(model, ev, cache)
    assert len(calls) == 6 and len(json.loads(cache.read_text())) == 3
