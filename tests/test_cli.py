"""CLI: a thin layer on top of the library. Errors are one clear line, never a traceback; flags are checked before
anything loads; every --help shows defaults and choices; one name per concept; the library never imports the CLI;
`import moelite.cli` stays free of torch. CLI subprocesses run with `-W error::FutureWarning`: a transformers
deprecation notice that the library fails to silence crashes them."""

import ast
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import moelite
from moelite.cli import COMMANDS, main
from moelite.cli.realshape import check_out
from moelite.core.memory import AutoBudget, resident_note
from moelite.eval.corpus import BESIDE_CHECKOUT, DATA_ENV, data_dir

PKG = Path(moelite.__file__).resolve().parent
#: commands that load a model, hence take the engine flags (predict: its `profile` subcommand)
MODEL_COMMANDS = ("generate", "serve", "bench", "eval", "tune", "calibrate", "trace", "predict profile")


def run(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "moelite.cli", *args],
                          capture_output=True, text=True, input=input, timeout=300,
                          env=None if env is None else dict(os.environ, **env))


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# ---- generate / info / calibrate, end to end -----------------------------------------------------------------
def test_generate_json(tiny):
    path = tiny("qwen2_moe", tokenizer=True)
    r = run("generate", "--model", str(path), "--prompt", "hi", "--max-tokens", "6", "--temperature", "0",
            "--json", "--expert-budget", "30%")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["completion_tokens"] >= 1 and last["resident_expert_bytes_peak"] <= last["expert_budget_bytes"]
    assert "ttft_s" in last and "decode_tok_s" in last and "peak_rss_bytes" in last


def test_generate_streams_and_prints_stats_line(tiny):
    """Also: under `-W error::FutureWarning` a transformers deprecation warning from the forward would end the run;
    the text streamed to stdout is the prompt, the continuation and the stats line, nothing else."""
    path = tiny("qwen2_moe", tokenizer=True)
    r = run("generate", "--model", str(path), "--max-tokens", "5", input="hello")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello") and "exact hit rate" in r.stdout.splitlines()[-1]
    assert "Warning" not in r.stdout + r.stderr


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
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("moelite: error: --expert-budget")
    r = run("generate", "--cache-policy", "nope")  # an argparse usage error: one line too, not the whole usage
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--cache-policy" in r.stderr


def test_calibrate_writes_a_profile_that_generate_accepts(tiny, tmp_path):
    path = tiny("qwen2_moe", tokenizer=True)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then it runs away again. " * 40)
    out = tmp_path / "profile.json"
    r = run("calibrate", "--model", str(path), "--text", str(text), "--score-tokens", "64", "--window", "48",
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


# ---- --help: every default, every choice, one name per concept ------------------------------------------------
def _help(capsys, *command) -> str:
    assert main([*command, "--help"]) == 0
    return capsys.readouterr().out


def _entries(text: str) -> dict[str, str]:
    """Option entries of a help text: '--flag' (every spelling) -> its full entry (option line + wrapped help)."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"  (-[^ ].*?)(?:  |$)", line)
        if m and not line.startswith("   "):
            current = [line]
            for spelling in re.findall(r"--?[a-z][a-z0-9-]*", m.group(1)):
                out[spelling] = current
        elif current is not None and line.startswith("   "):
            current.append(line)
        else:
            current = None
    return {k: " ".join(" ".join(v).split()) for k, v in out.items()}


def _all_commands():
    for mod in COMMANDS:
        yield (mod.NAME,) if mod.NAME != "predict" else ("predict", "train")
    yield ("predict", "profile")


def test_every_help_shows_every_default_and_choice(capsys):
    from moelite.config import CHOICES

    seen = 0
    for command in _all_commands():
        entries = _entries(_help(capsys, *command))
        assert "--help" in entries, command
        for flag, entry in entries.items():
            if flag in ("-h", "--help"):
                continue
            seen += 1
            assert "default" in entry, f"{' '.join(command)} {flag}: no default shown: {entry}"
        if " ".join(command) in MODEL_COMMANDS:
            for field, choices in CHOICES.items():
                entry = entries["--" + field.replace("_", "-")]
                assert all(c in entry for c in choices), f"{' '.join(command)}: choices missing: {entry}"
    assert seen > 150  # the parser of every command was read


def test_one_name_per_concept_in_every_command(capsys):
    """--max-tokens is always tokens to generate; scored tokens are --score-tokens; the engine flags (incl.
    --expert-budget and --cache-policy in bench) are in every command that loads a model; the old names are gone."""
    for command in _all_commands():
        entries = _entries(_help(capsys, *command))
        name = " ".join(command)
        if "--max-tokens" in entries:
            assert "tokens to generate" in entries["--max-tokens"], name
        if "--score-tokens" in entries:
            assert "scored tokens" in entries["--score-tokens"], name
        if name in MODEL_COMMANDS:
            assert {"--expert-budget", "--cache-policy", "--device", "--substitution-alpha"} <= set(entries), name
        if name != "predict profile" and "--data-dir" in entries:
            assert DATA_ENV in entries["--data-dir"], name
        for old in ("--budgets", "--policies", "--threads", "--tokens", "--speed-tokens", "--quality-tokens",
                    "--calibration-prompts"):
            assert old not in entries, f"{name}: {old}"
    bench = _entries(_help(capsys, "bench"))
    assert "10%,25%,50%" in bench["--expert-budget"] and "lru,lfu,score" in bench["--cache-policy"]


# ---- checked before anything loads ---------------------------------------------------------------------------
CHECKS = [
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--top-k", "-2"], "--top-k"),
    (["generate", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "--seed", "x"], "--seed"),
    (["generate", "--expert-budget", "lots"], "--expert-budget"),
    (["generate", "--substitution-alpha", "1.5"], "--substitution-alpha"),
    (["bench", "--cache-policy", "lru,nope"], "--cache-policy"),
    (["bench", "--expert-budget", "10%,200%"], "--expert-budget"),
    (["bench", "--expert-budget", "10%,lots"], "--expert-budget"),
    (["eval", "--alpha-sweep", "0,1.5", "--text", __file__], "--alpha-sweep"),
    (["tune", "--target-tok-s", "5", "--alphas", "0,x"], "--alphas"),
    (["tune", "--target-tok-s", "-3"], "--target-tok-s"),
    (["calibrate", "--probe-alpha", "1.2", "--text", __file__], "--probe-alpha"),
    (["predict", "profile", "--data-dir", "/nonexistent/moelite-data"], "--data-dir"),
]


def test_bad_flags_are_refused_before_anything_loads():
    """Each bad flag gives exit status 2 and one `moelite: error:` line naming it, for a model folder that does not
    exist (so the flag was checked before the model), and torch is never imported."""
    code = ("import contextlib, io, json, sys\nfrom moelite.cli import main\nout = []\n"
            f"for argv, _ in {CHECKS!r}:\n"
            "    err = io.StringIO()\n"
            "    with contextlib.redirect_stderr(err):\n"
            "        rc = main(argv + ['--model', '/nonexistent/moelite-model'])\n"
            "    out.append([rc, err.getvalue()])\n"
            "print(json.dumps({'results': out, 'torch': 'torch' in sys.modules}))\n")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for (argv, flag), (rc, err) in zip(CHECKS, res["results"]):
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("moelite: error:"), (argv, err)
        assert flag in lines[0] and "nonexistent/moelite-model" not in lines[0], (argv, err)
    assert res["torch"] is False


def test_import_cli_and_help_do_not_import_torch():
    r = _python("import sys\nimport moelite.cli\nfrom moelite.cli import main\n"
                "assert main(['--help']) == 0\n"
                "for c in ('generate', 'info', 'bench', 'eval', 'tune', 'calibrate', 'trace', 'predict'):\n"
                "    assert main([c, '--help']) == 0\n"
                "print(sorted(m for m in ('torch', 'transformers', 'moelite.engine') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


# ---- the library never imports the CLI ---------------------------------------------------------------------------
def cli_imports(source: str) -> list[int]:
    """Line numbers of statements in `source` that import moelite.cli (plain, from-, or importlib by name)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
                    (isinstance(func, ast.Name) and func.id in ("import_module", "__import__")):
                names = [str(node.args[0].value)]
        if any(n == "moelite.cli" or n.startswith("moelite.cli.") for n in names):
            lines.append(node.lineno)
    return lines


def test_cli_import_finder_finds_each_form():
    assert cli_imports("import moelite.cli\n") == [1]
    assert cli_imports("x = 1\nfrom moelite.cli.flags import engine_config\n") == [2]
    assert cli_imports("from moelite import cli\n") == [1]
    assert cli_imports("import importlib\ndef f():\n    importlib.import_module('moelite.cli')\n") == [3]
    assert cli_imports("from moelite.config import EngineConfig\nimport moelite.client\n") == []


def test_no_library_module_imports_the_cli():
    """Every module but moelite/cli/* and moelite/__main__.py (`python -m moelite`: the CLI's entry point)."""
    files = [f for f in PKG.rglob("*.py") if f.relative_to(PKG).parts[0] not in ("cli", "__main__.py")]
    assert len(files) > 30
    bad = [f"{f.relative_to(PKG.parent)}:{n}" for f in files for n in cli_imports(f.read_text(encoding="utf-8"))]
    assert bad == []


# ---- realshape, serve, the data folder, the budget note ------------------------------------------------------
def test_realshape_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    out = tmp_path / "rs"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["realshape", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelite: error:") and "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    check_out(out, force=True)  # --force lets it write there
    check_out(tmp_path / "new", force=False)  # a folder that does not exist yet is fine
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_out(tmp_path / "file", force=True)


def test_serve_on_a_port_in_use_is_one_line_before_loading():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("serve", "--port", str(port), "--model", "/nonexistent/moelite-model")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"moelite: error: port {port} on 127.0.0.1 is in use; pick another "
                                             "with --port"]


def test_data_dir_comes_from_the_flag_else_the_variable(tmp_path, monkeypatch):
    flag, env = tmp_path / "flag", tmp_path / "env"
    flag.mkdir()
    env.mkdir()
    monkeypatch.setenv(DATA_ENV, str(env))
    assert data_dir() == env and data_dir(flag) == flag
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=re.escape(DATA_ENV)):
        data_dir(required=False)  # a folder the user named must exist
    monkeypatch.delenv(DATA_ENV)
    assert data_dir(required=False) == (BESIDE_CHECKOUT if BESIDE_CHECKOUT.is_dir() else None)


def test_eval_reads_the_data_folder_named_by_the_variable(tiny, tmp_path, monkeypatch, capsys):
    path = tiny("qwen2_moe", tokenizer=True)
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert main(["eval", "--model", str(path), "--score-tokens", "16", "--window", "16", "--stride", "8",
                 "--speed-prompts", "0", "--no-reference", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rows"][0]["texts"]["wikitext-2"]["tokens"] == 16
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    assert main(["eval", "--model", str(path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_budget_of_every_expert_is_reported_as_all_experts_resident(tiny, capsys):
    assert resident_note("25%", 100, 400) is None
    assert "all experts resident" in resident_note("10GiB", 500, 400)
    room = AutoBudget(bytes=400, available=10_000, source="MemAvailable", dense=1, kv_cache=1, context=8,
                      headroom=1, experts=400)
    assert room.all_resident and "all experts resident" in room.note
    assert not AutoBudget(300, 10_000, "MemAvailable", 1, 1, 8, 1, experts=400).all_resident
    path = tiny("qwen2_moe", tokenizer=True)
    assert "all experts resident" in moelite.load(path, expert_budget="100%").budget_note
    assert moelite.load(path, expert_budget="30%").budget_note is None
    assert main(["info", str(path)]) == 0  # the tiny model's experts fit this machine many times over
    assert "all experts resident" in capsys.readouterr().out
