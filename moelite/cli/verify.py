"""`moelite verify DIR`: check a checkpoint in full: its headers, and every routed expert against its checksum.

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` runs `moelite.core.integrity.verify_checkpoint`
(the load-time header checks, then every routed expert read once, with a progress bar on stderr unless --json, and
checked against the manifest, which is recorded when there is none; `--rehash` records it anew for a checkpoint
changed on purpose), prints every damaged, unreadable or non-finite expert (layer, expert, tensors, shard file,
offset) and a summary (--json: one JSON line), and returns 0 when all is well, 1 on any finding. A header that is
refused is one `moelite: error:` line and exit status 2, as for every command.
"""

from __future__ import annotations

import json

from moelite.cli.flags import add_json_flag, positive_int

NAME = "verify"
HELP = "check a checkpoint in full: headers, and every routed expert against its recorded checksum"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="DIR", help="Hugging Face checkpoint folder to check")
    p.add_argument("--rehash", action="store_true",
                   help="record the experts' checksums anew from the files as they are now (after changing the "
                        "checkpoint on purpose); lists the experts whose checksum changed")
    p.add_argument("--io-threads", type=positive_int, default=2, help="threads reading experts")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.pt pickle weights (can run code: only for trusted files)")
    add_json_flag(p)


def _expert(d: dict) -> str:
    return (f"expert {d['expert']} of layer {d['layer']}: {', '.join(d['tensors'])} in "
            f"{', '.join(repr(s) for s in d['shards'])} at offset {d['offset']}")


def run(args) -> int:
    from moelite.config import format_bytes
    from moelite.core.integrity import verify_checkpoint

    rep = verify_checkpoint(args.model, rehash=args.rehash, progress=not args.json, threads=args.io_threads,
                            allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(rep.to_dict()))
        return 0 if rep.ok else 1
    for d in rep.mismatches:
        print(f"MISMATCH   {_expert(d)}")
    for d in rep.unreadable:
        print(f"UNREADABLE {_expert(d)}: {d['error']}")
    for d in rep.nonfinite:
        print(f"NON-FINITE {_expert(d)}: holds NaN or inf")
    for text in rep.problems:
        print(f"PROBLEM    {text}")
    for d in rep.rehash_changed:
        print(f"changed    {_expert(d)} (new checksum recorded)")
    what = (f"{rep.model}: headers ok; {rep.experts} routed experts in {rep.layers} layers "
            f"({format_bytes(rep.expert_bytes)}) read in {rep.seconds:.1f} s")
    if rep.changed_shards:
        what += f"; shards changed since the checksums were recorded: {', '.join(rep.changed_shards)}"
    if rep.recorded:
        what += f"; checksums recorded in {rep.manifest}"
        if args.rehash:
            what += f" ({len(rep.rehash_changed)} experts changed since the previous record)"
    elif not rep.unreadable:
        what += f"; checked against the checksums in {rep.manifest}"
    print(f"moelite verify: {what}")
    if rep.ok:
        print("moelite verify: ok: every routed expert matches its checksum and holds finite values"
              if not rep.recorded else "moelite verify: ok: no unreadable or non-finite expert; later loads and "
                                       "reads are checked against these checksums")
        return 0
    n_bad = len(rep.mismatches) + len(rep.unreadable) + len(rep.nonfinite)
    print(f"moelite verify: FAILED: {len(rep.mismatches)} experts differ from their recorded checksums, "
          f"{len(rep.unreadable)} cannot be read, {len(rep.nonfinite)} hold NaN or inf"
          + (f"; {len(rep.problems)} other problems" if rep.problems else "") + f" ({n_bad} of {rep.experts}). "
          "Restore the damaged files (re-download them); if you changed the checkpoint on purpose, run "
          "`moelite verify DIR --rehash` to record its new checksums")
    return 1
