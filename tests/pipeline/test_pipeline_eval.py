"""`sgtv eval`: perplexity and greedy exact match equal what transformers' PyTorch model gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from sgtv_jax.cli import main
from sgtv_jax.pipeline.evaluate import exact_match, is_match, load_model, perplexity
from tests.helpers import tiny_models as H


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = H.make_family(root, "llama", tasks=1)
    return root, paths["base"]


def test_perplexity_equals_torch(tiny):
    root, base = tiny
    model, tok = load_model(base)
    text = H.TEXT[:700]
    got = perplexity(model, tok, text, seqlen=32, batch_size=3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for s in range(0, len(ids), 32):
        w = torch.tensor([ids[s : s + 32]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(tm(w).logits[0, :-1].double(), -1)
        nll -= logp.gather(1, w[0, 1:, None]).sum().item()
        n += w.shape[1] - 1
    assert got == pytest.approx(float(np.exp(nll / n)), rel=1e-4)


def test_exact_match_against_torch_greedy(tiny, tmp_path, capsys):
    root, base = tiny
    model, tok = load_model(base)
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    prompts = ["The quick brown", "Numbers like 12,", "every linear layer"]
    recs = []
    for p in prompts:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            for _ in range(3):
                nxt = tm(ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], 1)
        cont = tok.decode(ids[0, -3:].tolist(), skip_special_tokens=True)
        recs.append({"prompt": p, "answer": cont})
    from sgtv_jax.pipeline.evaluate import greedy_generate

    gens = greedy_generate(model, tok, prompts, 3, batch_size=2)  # two batches, padded rows
    assert gens == [r["answer"] for r in recs]
    wrong = [{"prompt": r["prompt"], "answer": r["answer"] + "zzz"} for r in recs]
    assert exact_match(model, tok, wrong)[0] == 0.0
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    t = tmp_path / "t.txt"
    t.write_text(H.TEXT[:300])
    assert main(["eval", str(base), "--jsonl", str(f), "--text", str(t), "--seqlen", "32"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= res["exact_match"] <= 1.0 and res["perplexity"] > 1.0


def test_is_match_rule():
    assert is_match(" Paris.\nQ:", " Paris")
    assert not is_match(" Parisian", "Paris")
    assert not is_match(" Lyon", "Paris")


def test_forced_exact_match_equals_greedy_decoding(tiny):
    """One teacher-forced pass decides each record as greedy decoding (answer's tokens + one) does."""
    from sgtv_jax.pipeline.evaluate import forced_exact_match, greedy_generate

    root, base = tiny
    model, tok = load_model(base)
    prompts = ["The quick brown", "Numbers like 12,", "every linear layer", "A merge of", "so do words", "Calibration"]
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    recs = []
    for p in prompts:
        for k in (1, 2, 3):
            cont = greedy_generate(model, tok, [p], k)[0]
            # random weights emit stray bytes (U+FFFD, control chars) that re-tokenise differently: skip those
            if not cont.strip() or not cont.isprintable() or "\ufffd" in cont:
                continue
            recs.append({"prompt": p, "answer": cont})  # greedy's own continuation: a hit if the next char allows
            recs.append({"prompt": p, "answer": cont + " the"})  # one token too many (unless greedy says " the")
            recs.append({"prompt": p, "answer": " dog" + cont})  # first token wrong (unless greedy says " dog")
    # greedy_generate is checked against transformers above; forced must agree record by record
    want = [
        is_match(greedy_generate(model, tok, [r["prompt"]], len(enc(r["answer"])) + 1)[0], r["answer"]) for r in recs
    ]
    each = [forced_exact_match(model, tok, [r], batch_size=1)[0] == 1.0 for r in recs]
    assert each == want, [
        (r, g)
        for r, e, w in zip(recs, each, want)
        if e != w
        for g in greedy_generate(model, tok, [r["prompt"]], len(enc(r["answer"])) + 1)
    ]
    assert 0 < sum(want) < len(want) and len(recs) >= 9  # both outcomes occur
    acc, gens = forced_exact_match(model, tok, recs, batch_size=4)  # several batches, padded rows
    assert acc == pytest.approx(np.mean(want))
    hit = [g for g, w in zip(gens, want) if w]
    assert all(is_match(g, r["answer"]) for g, r, w in zip(gens, recs, want) if w) and hit
