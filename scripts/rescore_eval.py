"""Score the videos of an earlier `soragen eval` again with the current detector, without making them again.

    python scripts/rescore_eval.py EVAL_DIR [EVAL_DIR ...] [--write]

For each folder, prints the category table (and, for videos of 10 s and more, the coherence table) as its
eval.json recorded them and as the detector scores the same videos now: what a change to the detector does
to reported figures. With --write the new report goes to EVAL_DIR/eval.rescored.json (eval.json is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rescore(folder: Path) -> tuple[dict, dict]:
    """(the recorded report, the report with every video scored again)."""
    from soragen.config import Config, update
    from soragen.errors import UserError
    from soragen.evaluation.run import score_file, tabulate, tabulate_long, tabulate_shapes

    path = folder / "eval.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        cfg = Config.model_validate(old["config"])
        results = old["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not the report of a soragen eval ({type(e).__name__}: {e}); give the folder "
                        "an evaluation wrote (its --out)") from None
    new_results = []
    for n, rec in enumerate(results, 1):
        video = folder / rec["video"]
        if not video.is_file():
            raise UserError(f"{video}, video {n} of {path}, is missing: it cannot be scored again")
        new = {k: v for k, v in rec.items() if k not in ("verdicts", "score", "long")}
        new_results.append(new | score_file(video, rec["prompt"], update(cfg, seed=rec["seed"])))
        print(f"\r{folder.name}: {n}/{len(results)} videos scored", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    new = old | {"results": new_results, "table": tabulate(new_results), "shape_table": tabulate_shapes(new_results),
                 "long_table": tabulate_long(new_results)}
    return old, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", metavar="EVAL_DIR")
    parser.add_argument("--write", action="store_true", help="save each new report as EVAL_DIR/eval.rescored.json")
    args = parser.parse_args()

    from soragen.errors import UserError
    from soragen.evaluation.run import format_long_table, format_shape_table, format_table
    from soragen.video_io import write_json

    for folder in args.folders:
        try:
            old, new = rescore(folder)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"{folder} ({new['seconds']:g}-s videos, {len(new['results'])}): as recorded")
        print(format_table(old["table"]))
        print("scored again now")
        print(format_table(new["table"]))
        print(format_shape_table(new["shape_table"]))
        if new["long_table"]:
            if old.get("long_table"):
                print("coherence as recorded")
                print(format_long_table(old["long_table"]))
            print("coherence scored again now")
            print(format_long_table(new["long_table"]))
        if args.write:
            write_json(folder / "eval.rescored.json", new)
            print(f"wrote {folder / 'eval.rescored.json'}")


if __name__ == "__main__":
    main()
