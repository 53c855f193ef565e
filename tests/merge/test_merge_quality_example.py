"""The merge-quality benchmark's task data: correct answers, train / calibration / eval disjoint."""

import importlib.util
from pathlib import Path

from sgtv_jax.pipeline.config import parse_config

spec = importlib.util.spec_from_file_location("merge_quality", Path(__file__).parents[2] / "examples/merge_quality.py")
mq = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mq)


def test_addition_answers_and_disjoint_splits():
    parts = mq.addition((400, 64, 64))
    assert [len(p) for p in parts] == [400, 64, 64]
    for p in parts:
        for r in p:
            a, b = r["prompt"].removesuffix("=").split("+")
            assert int(r["answer"]) == int(a) + int(b)
    prompts = [{r["prompt"] for r in p} for p in parts]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_reversal_answers_and_disjoint_splits():
    parts = mq.reversal((400, 64, 64))
    for p in parts:
        for r in p:
            word = r["prompt"][len("Reverse: ") : -len(" ->")]
            assert r["answer"].split() == word.split()[::-1]
    prompts = [{r["prompt"] for r in p} for p in parts]
    assert [len(s) for s in prompts] == [400, 64, 64]
    assert not (prompts[0] & prompts[2] or prompts[1] & prompts[2])


def test_code_splits_are_disjoint_and_fixed_by_the_seed():
    parts = mq.code_snippets((200, 48, 48))
    sets = [set(p) for p in parts]
    assert [len(s) for s in sets] == [200, 48, 48]
    assert not (sets[0] & sets[2] or sets[1] & sets[2] or sets[0] & sets[1])
    assert mq.code_snippets((200, 48, 48)) == parts


def test_every_variant_is_a_valid_config(tmp_path):
    prep = {"base": tmp_path / "base", "fts": {t: tmp_path / f"ft_{t}" for t in mq.TASKS}}
    labels = [label for label, _ in mq.variants(quick=False)]
    assert len(labels) == len(set(labels))
    assert {label for label, _ in mq.variants(quick=True)} <= set(labels)
    for label, over in mq.variants(quick=False):
        cfg = parse_config(mq.config_for(prep, tmp_path, over, 16, 64))
        assert cfg.merge_method == over["merge_method"], label
