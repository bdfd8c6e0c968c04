"""moelite eval / tune: teacher-forced decode equals the full forward, exact reference comparisons, HellaSwag
scoring, the alpha fit, and the two commands end to end on a tiny checkpoint."""

import json
import math

import pytest
import torch

import moelite
from moelite.eval.evaluate import (Reference, compare_text, decode_logprobs, hellaswag, measure_decode, measure_interleaved,
                              read_hellaswag, windows)
from moelite.eval.tune import fit_and_pick

from conftest import SHARED_DATA



pytestmark = pytest.mark.usefixtures("one_thread")

def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 2), (100, 32, 16), (7, 8, 8), (33, 16, 5)]:
        scored = []
        for begin, end, first in windows(n, w, s):
            assert end - begin <= w and first >= 1
            assert first >= min(w - s, end - begin) or begin == 0  # full context except the first window
            scored += range(begin + first, end)
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="window"):
        windows(10, 4, 5)


def test_decode_path_matches_full_forward(tiny):
    eng = moelite.load(tiny("qwen2_moe"), expert_budget="25%")
    ids = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    full = torch.log_softmax(eng.logits([ids])[0], -1)  # [T, V]: row t predicts ids[t + 1]
    for start in (1, 7):
        lp = decode_logprobs(eng, ids, start)
        assert lp.shape == (len(ids) - start, 128)
        assert (lp - full[start - 1:-1]).abs().max() < 1e-4
    # perplexity through the sliding windows equals the full-forward one when one window covers everything
    res = compare_text(eng, ids, 0.0, None, window=32, stride=32)
    want = math.exp(-float(full[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean()))
    assert res["tokens"] == 19 and abs(res["perplexity"] - want) < 1e-4 * want


def test_reference_comparison(tiny):
    path = tiny("olmoe")
    ids = torch.randint(3, 128, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = Reference(moelite.load(path, expert_budget="100%"))
    exact = compare_text(moelite.load(path, expert_budget="25%"), ids, 0.0, ref, window=32, stride=16)
    # float rounding only: resident experts are summed in one grouped product at 100%, some one by one at 25%
    assert exact["top1_agreement"] == 1.0 and exact["mean_kl"] < 1e-6
    assert abs(exact["perplexity_ratio"] - 1) < 1e-5 and exact["expert_substitutions"] == 0
    sub = compare_text(moelite.load(path, expert_budget="25%"), ids, 0.7, ref, window=32, stride=16, max_tokens=40)
    assert sub["tokens"] == 40 and sub["expert_substitutions"] > 0 and sub["mean_kl"] > 1e-5
    assert 0 < sub["decode_substituted_rate"] < 1
    rates = sub["decode_exact_hit_rate"] + sub["decode_substituted_rate"]
    assert abs(rates - sub["decode_hit_or_substituted_rate"]) < 1e-12


def test_measure_decode_counts(tiny):
    eng = moelite.load(tiny("mixtral"), expert_budget="25%")
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    r = measure_decode(eng, prompts, 6, 0.5)
    assert r["decode_tokens"] == 2 * 5 and r["tpot_ms"] > 0 and len(r["substitutions_per_request"]) == 2
    assert sum(r["substitutions_per_request"]) == r["expert_substitutions"]


def test_measure_interleaved(tiny):
    path = tiny("mixtral")
    engines = {"exact": (moelite.load(path, expert_budget="25%"), 0.0),
               "sub": (moelite.load(path, expert_budget="25%"), 0.5)}
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    res = measure_interleaved(engines, prompts, 5, rounds=3)
    assert res["exact"]["prompts_measured"] == 3 and res["exact"]["substitutions_per_request"] == [0, 0, 0]
    assert sum(res["sub"]["substitutions_per_request"]) > 0 and res["sub"]["tpot_ms"] > 0
    for r in res.values():
        rates = r["decode_exact_hit_rate"] + r["decode_substituted_rate"]
        assert abs(rates - r["decode_hit_or_substituted_rate"]) < 1e-12


def test_hellaswag_scoring(tiny, tmp_path):
    path = tiny("qwen2_moe", tokenizer=True)
    items = [("A man walks", "2", ["to sea.", "dog", "in.", "xyz"]),
             ("She has a", "0", ["cup.", "tree", "the a", "!"])]
    f = tmp_path / "hs.txt"
    f.write_text("".join(f"{c}\n{g}\n" + "".join(e + "\n" for e in ends) for c, g, ends in items))
    assert read_hellaswag(f)[1] == ("She has a", 0, ["cup.", "tree", "the a", "!"])
    eng = moelite.load(path, expert_budget="30%")
    res = hellaswag(eng, f, None, 0.0, Reference(moelite.load(path, expert_budget="100%")))
    # independent check: pick by summed log-likelihood from the full forward
    correct = 0
    for ctx, gold, ends in read_hellaswag(f):
        ctx_ids = eng.encode(ctx)
        lls = []
        for e in ends:
            cont = eng.tokenizer.encode(" " + e, add_special_tokens=False)
            lp = torch.log_softmax(eng.logits([ctx_ids + cont])[0], -1)
            lls.append(sum(float(lp[len(ctx_ids) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += max(range(4), key=lls.__getitem__) == gold
    assert res["items"] == 2 and res["accuracy"] == correct / 2 and res["choice_agreement_with_exact"] == 1.0
    bad = tmp_path / "bad.txt"
    bad.write_text("ctx\nseven\na\nb\nc\nd\n")
    with pytest.raises(ValueError, match="gold label"):
        read_hellaswag(bad)


def test_real_hellaswag_file_parses():
    f = SHARED_DATA / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not f.is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set MOELITE_DATA_DIR)")
    items = read_hellaswag(f, limit=25)
    assert len(items) == 25 and all(0 <= g <= 3 and len(e) == 4 for _, g, e in items)


def test_fit_and_pick():
    alphas = [0.0, 0.1, 0.2, 0.3, 0.4]
    t = [100 - 50 * a for a in alphas]  # T(alpha) = 100 - 50 alpha ms
    r = fit_and_pick(alphas, t, 90.0)
    assert r["met"] and abs(r["alpha"] - 0.2) < 1e-9 and abs(r["fit_r2"] - 1) < 1e-9
    assert fit_and_pick(alphas, t, 200.0)["alpha"] == 0.0  # already fast enough: no substitution
    miss = fit_and_pick(alphas, t, 10.0)
    assert not miss["met"] and miss["alpha"] == 0.4


def _cli(capsys, *args):
    from moelite.cli import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_sweep_and_tune_cli(tiny, tmp_path, capsys):
    path = tiny("qwen2_moe", tokenizer=True)
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 6)
    rc, out, err = _cli(capsys, "eval", "--model", str(path), "--text", str(text), "--alpha-sweep", "0,0.5",
                        "--score-tokens", "24", "--window", "32", "--stride", "16", "--speed-prompts", "2",
                        "--max-tokens", "4", "--out", str(tmp_path / "out"), "--num-threads", "1", "--json")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert [row["alpha"] for row in res["rows"]] == [0.0, 0.5]
    assert res["rows"][0]["texts"]["t"]["top1_agreement"] == 1.0
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".json", ".md", ".png"]
    assert all((tmp_path / "out" / f.split("/")[-1]).stat().st_size > 0 for f in res["files"])
    rc, out, err = _cli(capsys, "tune", "--model", str(path), "--target-tok-s", "0.001", "--alphas", "0,0.3",
                        "--n-prompts", "2", "--max-tokens", "3", "--quality-text", str(text),
                        "--score-tokens", "20", "--num-threads", "1", "--json")
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["met"] and res["alpha"] == 0.0 and res["quality"]["top1_agreement"] == 1.0
    assert len(res["measured"]) == 2 and all(p["tpot_ms"] > 0 for p in res["measured"])
    rc, out, err = _cli(capsys, "tune", "--model", str(path), "--target-tok-s", "-3")
    assert rc == 2 and "--target-tok-s" in err
    rc, out, err = _cli(capsys, "eval", "--model", str(path), "--text", str(text), "--alpha-sweep", "0,1.5")
    assert rc == 2 and "--alpha-sweep" in err
