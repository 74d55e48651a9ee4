import json
from pathlib import Path

import pytest

from soragen.errors import UserError
from soragen.evaluation.run import category, read_prompts, tabulate

ROOT = Path(__file__).resolve().parents[1]


def test_categories():
    assert category("a large red circle moving right") == "seen"
    assert category("a red circle moving right and a blue box bouncing") == "two objects"
    assert category("a red circle moving right behind a gray wall") == "wall"
    assert category("a green triangle moving left") == "held out"
    assert category("a large cyan square bouncing") == "held out"
    assert category("a magenta ball moving down behind a gray wall") == "held out"


@pytest.mark.parametrize("name", ["shapes-eval.txt", "shapes-long.txt"])
def test_shipped_prompt_lists_parse(name):
    prompts = read_prompts(ROOT / "configs" / "prompts" / name)
    assert len(prompts) >= 7


def test_eval_list_covers_every_category():
    prompts = read_prompts(ROOT / "configs" / "prompts" / "shapes-eval.txt")
    cats = [category(p) for p in prompts]
    assert all(cats.count(c) >= 10 for c in ("seen", "two objects", "wall", "held out"))


def test_bad_prompt_line_named(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# comment\na red ball moving left\na purple ball\n")
    with pytest.raises(UserError, match="line 3"):
        read_prompts(path)
    path.write_text("a red ball moving left\x0c\na purple ball\n")  # a form feed ends no line in an editor
    with pytest.raises(UserError, match="line 2"):
        read_prompts(path)


def test_a_batch_prompt_file_says_eval_reads_plain_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red ball moving left"}\n')
    with pytest.raises(UserError, match=r"line 1: not a Shapes World caption: .*\(eval reads plain text, one caption a "
                                        r"line; batch's \.jsonl prompt files are not read as such\)"):
        read_prompts(path)


def test_tabulate():
    rows = [{"category": "seen", "verdicts": {"colour": True, "all": True, "count": True}},
            {"category": "seen", "verdicts": {"colour": False, "all": False, "count": True}}]
    table = tabulate(rows)
    assert table["seen"]["colour"] == 0.5 and table["seen"]["count"] == 1.0 and table["overall"]["videos"] == 2


def test_invalid_utf8_prompt_file_is_one_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red ball moving left\n\xff\xfe\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_prompts(path)


def test_tabulate_long_and_its_table():
    from soragen.evaluation.run import format_long_table, tabulate_long

    long_a = {"objects": [{"keeps": 1.0, "moves": 0.5, "vanishes": False, "keeps_bouncing": True,
                           "apex_heights": [20.0, 21.0, 20.5, 30.0], "apexes": 4,
                           "apexes_in_band": 3}], "count": 1.0,
              "boundary_jump": 1.5}
    long_b = {"objects": [{"keeps": 0.5, "moves": 1.0, "vanishes": True, "re_emerges": False,
                           "wall_passages": 10, "wall_passages_through": 9},
                          {"keeps": 0.0, "moves": 0.0, "vanishes": True}], "count": 0.5, "boundary_jump": 2.5}
    rows = [{"long": long_a}, {"long": long_b}, {"verdicts": {}}]  # the last: a short video, not counted
    table = tabulate_long(rows)
    assert table["videos"] == 2 and table["objects"] == 3
    assert table["keeps"] == pytest.approx(0.5) and table["moves"] == pytest.approx(0.5)
    assert table["never_vanishes"] == pytest.approx(1 / 3)
    assert table["keeps_bouncing"] == 1.0 and table["re_emerges"] == 0.0
    assert table["count"] == pytest.approx(0.75) and table["boundary_jump"] == pytest.approx(2.0)
    assert table["apexes_in_band"] == pytest.approx(0.75) and table["passages_through"] == pytest.approx(0.9)
    text = format_long_table(table)
    assert "2 videos, 3 objects" in text and "33.3%" in text and "2.00x" in text
    lines = text.splitlines()  # each graded figure under the measure it grades
    at = next(i for i, line in enumerate(lines) if "re-emerges" in line)
    assert "far side" in lines[at + 1] and "90.0%" in lines[at + 1]
    assert "of their median" in lines[at - 1] and "75.0%" in lines[at - 1]
    assert tabulate_long([{"verdicts": {}}]) is None


def test_tabulate_shapes_counts_every_object_by_the_shape_asked_and_drawn():
    from soragen.evaluation.run import format_shape_table, tabulate_shapes

    obj = lambda right, drawn: {"shape": right, "drawn_shape": drawn}  # noqa: E731
    rows = [{"prompt": "a red square moving left and a blue ball moving up",
             "score": {"objects": [obj(False, "circle"), obj(True, "circle")]}},
            {"prompt": "a large green box bouncing", "score": {"objects": [obj(False, None)]}},
            {"prompt": "一个红色的大方块向右移动", "score": {"objects": [obj(True, "square")]}},  # a large red box
            {"prompt": "a small cyan ball moving right", "score": {"objects": [obj(False, "upside-down triangle")]}}]
    table = tabulate_shapes(rows)
    assert list(table) == ["circle", "square"]  # no triangle was asked for
    assert table["square"]["objects"] == 3 and table["square"]["right"] == pytest.approx(1 / 3)
    assert table["square"]["drawn"] == {"circle": 1, "square": 1, "triangle": 0, "none": 1}
    assert table["circle"] == {"objects": 2, "right": 0.5, "drawn": {"circle": 1, "square": 0, "triangle": 0, "none": 0,
                                                                      "upside-down triangle": 1}}
    lines = format_shape_table(table).splitlines()
    assert "drawn as circle / square / triangle / upside-down triangle / not found" in lines[0]
    assert lines[1].split()[:4] == ["circle", "2", "50.0%", "1"] and lines[1].endswith("1 / 0 / 0 / 1 / 0")
    assert lines[2].split() == ["square", "3", "33.3%", "1", "/", "1", "/", "0", "/", "0", "/", "1"]


def test_rescore_script_scores_an_evaluation_again_as_it_was_scored(tmp_path, tiny_yaml, capsys, monkeypatch):
    """scripts/rescore_eval.py on an evaluation the current detector made gives its tables back; it names a
    missing video and a folder that holds no evaluation."""
    from conftest import load_script, run_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle moving left\na blue box bouncing behind a gray wall\n")
    ev = tmp_path / "ev"
    args = ["eval", "--prompts", str(prompts), "--out", str(ev), "-c", str(tiny_yaml), "--seconds", "10"]
    assert run_cli(args, capsys)[0] == 0
    script = load_script("rescore_eval")
    old, new = script.rescore(ev)
    assert new["table"] == old["table"] and new["long_table"] == old["long_table"] is not None
    assert new["shape_table"] == old["shape_table"] and set(old["shape_table"]) == {"circle", "square"}
    monkeypatch.setattr("sys.argv", ["rescore_eval.py", str(ev), "--write"])
    script.main()
    assert json.loads((ev / "eval.rescored.json").read_text())["table"] == old["table"]
    assert "coherence scored again now" in capsys.readouterr().out
    (ev / "000_seed0.mp4").unlink()
    with pytest.raises(UserError, match="000_seed0.mp4, video 1 of .* is missing"):
        script.rescore(ev)
    with pytest.raises(UserError, match="is not the report of a soragen eval"):
        script.rescore(tmp_path)
