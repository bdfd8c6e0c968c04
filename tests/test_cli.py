"""CLI: thin layer over the API; errors are one clear line, never a traceback."""

import json
import subprocess
import sys


def run(*args, input=None):
    return subprocess.run([sys.executable, "-m", "moelite.cli", *args], capture_output=True, text=True,
                          input=input, timeout=300)


def test_generate_json(tiny):
    path = tiny("qwen2_moe", tokenizer=True)
    r = run("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "6", "--temperature", "0",
            "--json", "--expert-budget", "30%")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["completion_tokens"] >= 1 and last["resident_expert_bytes_peak"] <= last["expert_budget_bytes"]
    assert "ttft_s" in last and "decode_tok_s" in last and "peak_rss_bytes" in last


def test_generate_streams_and_prints_stats_line(tiny):
    path = tiny("qwen2_moe", tokenizer=True)
    r = run("generate", "--model", str(path), "--max-tokens", "5", input="hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello") and "expert hit rate" in r.stdout.splitlines()[-1]


def test_info(tiny):
    r = run("info", str(tiny("deepseek_v3")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["model_type"] == "deepseek_v3" and info["moe_layers"] == 2 and info["top_k"] == 2


def test_errors_are_one_line(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    r = run("generate", "--model", str(tmp_path), "--prompt", "x", "--expert-budget", "lots")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_calibrate_writes_a_profile_that_generate_accepts(tiny, tmp_path):
    path = tiny("qwen2_moe", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then it runs away again. " * 40)
    out = tmp_path / "profile.json"
    r = run("calibrate", "--model", str(path), "--text", str(text), "--max-tokens", "64", "--window", "48",
            "--stride", "24", "--probe-alpha", "0.6", "--expert-budget", "30%", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text())["profile"] == res["profile"] and len(res["profile"]) == len(res["layers"])
    assert "| layer |" in r.stdout
    r = run("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "3", "--json", "--expert-budget", "30%",
            "--substitution-alpha", "0.3", "--substitution-profile", str(out))
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(path), "--prompt", "hi", "--substitution-profile", "1,2")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "multipliers for the" in r.stderr
    r = run("calibrate", "--model", str(path), "--text", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
