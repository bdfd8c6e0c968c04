"""The streaming detokenizer: its pieces add up to the tokenizer's decode of all ids, incomplete UTF-8 and possible
stop-string starts are held back, a stop string is never emitted even in part, and the decode work is linear."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moelite.demo import SHIPPED
from moelite.serve.detokenizer import StreamingDetokenizer

TEXT = ("Héllo wörld: the cat sat on the mat, and the naïve café served crème brûlée for 5 € (or 😀 日本語). "
        "Then the STAR of the show said: STOP right there.\nUser: and more\n")


def _decoder(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def demo_tok():
    if not (SHIPPED / "tokenizer.json").is_file():
        pytest.skip("the shipped demo model's tokenizer is not in this checkout")
    return AutoTokenizer.from_pretrained(str(SHIPPED))


@pytest.fixture(scope="module")
def byte_tok(tiny):
    """The byte-level BPE of the tiny test checkpoints: one token per byte (multi-byte characters always split)."""
    return AutoTokenizer.from_pretrained(str(tiny("olmoe", tokenizer=True, vocab_size=300)))


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-style tokenizer (Llama's decoder: '▁' -> ' ', byte fallback, strip one leading space):
    decoding a suffix alone drops the space its first word starts with."""
    pieces = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "▁and", "▁STAR", "▁STOP", "▁", "ST", "OP", "e", "a",
              "t", "h", "c", "s", "o", "n", "m", "r", "é", "▁é", ".", ","]
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    vocab += [(p, -1.0 - 0.01 * i) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    ids = fast.encode("the cat", add_special_tokens=False)
    assert fast.decode(ids[1:]) == "cat" and fast.decode(ids) == "the cat"  # the case the prefix decode is for
    return fast


def _stream(decode, ids, stop=()):
    d = StreamingDetokenizer(decode, stop)
    pieces = []
    for i in ids:
        pieces.append(d.add(i))
        if d.stopped:
            break
    pieces.append(d.finish())
    return d, pieces


def _random_text(rng: random.Random, words: int) -> str:
    vocab = TEXT.replace(".", " ").replace(",", " ").split() + ["€", "😀", "日本", "ü", "\n", "  "]
    return " ".join(rng.choice(vocab) for _ in range(words))


@pytest.mark.parametrize("name", ["demo_tok", "byte_tok", "sp_tok"])
def test_pieces_add_up_to_the_decode_of_all_ids(request, name):
    tok = request.getfixturevalue(name)
    decode, rng = _decoder(tok), random.Random(0)
    texts = [tok.encode(TEXT, add_special_tokens=False)]
    texts += [tok.encode(_random_text(rng, 30), add_special_tokens=False) for _ in range(10)]
    split = 0
    for ids in texts:
        d, pieces = _stream(decode, ids)
        assert "".join(pieces) == d.text == decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # valid text: no half character was ever handed out
        split += sum(decode([i]).endswith("\ufffd") for i in ids)
    assert split > 0  # multi-byte characters were split across tokens in these cases
    for _ in range(10):  # any ids, invalid byte sequences included
        ids = [rng.randrange(len(tok)) for _ in range(60)]
        d, pieces = _stream(decode, ids)
        assert d.text == decode(ids)
        if name != "sp_tok":  # byte-level: windows decode to the matching part of the whole, always (byte
            assert "".join(pieces) == d.text  # fallback rewrites a whole invalid run: only `text` is exact there)


def test_incomplete_character_is_held_until_it_completes(byte_tok):
    decode = _decoder(byte_tok)
    ids = byte_tok.encode("a€b", add_special_tokens=False)  # 'a', 3 bytes of '€', 'b'
    assert len(ids) == 5
    d = StreamingDetokenizer(decode)
    assert [d.add(i) for i in ids] == ["a", "", "", "€", "b"]
    assert d.finish() == "" and d.text == "a€b"


def test_sentencepiece_leading_space_kept(sp_tok):
    d, pieces = _stream(_decoder(sp_tok), sp_tok.encode("the cat sat", add_special_tokens=False))
    assert pieces[:3] == ["the", " cat", " sat"]


@pytest.mark.parametrize("name", ["demo_tok", "byte_tok", "sp_tok"])
def test_stop_string_split_across_tokens_is_never_emitted(request, name):
    tok = request.getfixturevalue(name)
    decode = _decoder(tok)
    ids = tok.encode(TEXT, add_special_tokens=False)
    for stop in (["STOP"], ["\nUser:"], ["never there", "said: S"], ["ST", "STOP"]):
        full = decode(ids)
        want = full[:min(full.find(s) for s in stop if s in full)]
        d, pieces = _stream(decode, ids, stop)
        assert d.stopped and "".join(pieces) == d.text == want
        assert not any(s in "".join(pieces) for s in stop)
    # a held-back possible start that turns out not to be a stop ("STAR" for "STOP") is emitted later, intact
    d, pieces = _stream(decode, ids, ["STOPPED"])
    assert not d.stopped and "".join(pieces) == decode(ids)


def test_stop_holdback_emits_nothing_that_could_start_the_stop(byte_tok):
    decode = _decoder(byte_tok)
    d = StreamingDetokenizer(decode, ["\nUser:"])
    out = [d.add(i) for i in byte_tok.encode("hi\nUs", add_special_tokens=False)]
    assert "".join(out) == "hi"  # "\nUs" could still become "\nUser:"
    out += [d.add(i) for i in byte_tok.encode("ed", add_special_tokens=False)]
    assert "".join(out) == "hi\nUsed" and not d.stopped
    out += [d.add(i) for i in byte_tok.encode("\nUser: x", add_special_tokens=False)]
    assert d.stopped and "".join(out) + d.finish() == "hi\nUsed" == d.text


def test_decode_work_is_linear_in_the_output(demo_tok):
    calls = {"n": 0, "ids": 0}

    def counting(ids):
        calls["n"] += 1
        calls["ids"] += len(ids)
        return demo_tok.decode(ids, skip_special_tokens=True)

    ids = demo_tok.encode(_random_text(random.Random(1), 400), add_special_tokens=False)
    totals = {}
    for n in (200, 400):
        calls.update(n=0, ids=0)
        _stream(counting, ids[:n], ["\nUser:"])
        totals[n] = calls["ids"]
        assert calls["n"] <= 3 * n  # a couple of small decodes per token, one full decode at the end
    # re-decoding every id at every token (quadratic) would give about 4x; linear gives 2x
    assert totals[400] <= 2.2 * totals[200] and totals[400] <= 8 * 400


def test_add_after_finish_and_bad_stop_refused(byte_tok):
    d = StreamingDetokenizer(_decoder(byte_tok))
    d.finish()
    with pytest.raises(RuntimeError, match="after finish"):
        d.add(5)
    with pytest.raises(ValueError, match="stop"):
        StreamingDetokenizer(_decoder(byte_tok), ["ok", ""])
