"""`soragen batch`: prompt files, seeds, shards, manifests, resume, failure isolation; real processes and signals."""

import csv
import json
import random
from pathlib import Path

import imageio.v2 as imageio
import pytest
import yaml

from soragen.batch import (
    MANIFEST, derive_seed, files_intact, parse_shard, plan_items, read_prompt_file, read_records, run_batch,
    shard_from_environment, shard_items,
)
from soragen.errors import UserError

from conftest import run_cli, tiny_config

COLOURS = ("red", "blue", "green", "yellow", "white")
SHAPES = ("ball", "square", "triangle", "star")
PROMPTS = [f"a {c} {s} bouncing" for c in COLOURS for s in SHAPES]  # 20


def base_config(**video):
    return tiny_config(video={"seconds": 1, "fps": 4, "width": 32, "height": 32, **video}, sampler={"steps": 2})


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(base_config().to_yaml())
    return path


def twenty_items():
    """20 items using every field: per-item seconds, seed, guidance, steps, negative prompt, and names."""
    items = [{"prompt": p} for p in PROMPTS]
    items[1]["seconds"] = 0.5
    items[2]["seed"] = 7
    items[3]["guidance"] = 1.0
    items[4]["steps"] = 3
    items[5]["negative_prompt"] = "blurry"
    items[6]["name"] = "../../escape attempt"
    items[7]["name"] = "Clip/07"
    items[8] = {"prompt": PROMPTS[0]}  # the same item twice: still two videos
    return items


def write_prompt_file(path: Path, items) -> Path:
    """Write items as .txt (prompts only), .jsonl, .csv or .yaml."""
    match path.suffix:
        case ".txt":
            path.write_text("# prompts\n\n" + "\n".join(i["prompt"] for i in items) + "\n", encoding="utf-8")
        case ".jsonl":
            path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
        case ".csv":
            columns = ["prompt", "seconds", "seed", "guidance", "steps", "negative_prompt", "name"]
            with path.open("w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(items)
        case ".yaml":
            path.write_text(yaml.safe_dump(items, allow_unicode=True), encoding="utf-8")
    return path




def count_frames(path):
    reader = imageio.get_reader(path)
    n = sum(1 for _ in reader)
    reader.close()
    return n


def manifest(folder):
    return read_records(folder / MANIFEST)


def expected_files(records):
    names = {MANIFEST, "index.html"}
    for r in records:
        names |= {e["path"] for e in r["files"].values()}
    return names


def videos(folder):
    return {p.name: p.read_bytes() for p in folder.glob("*.mp4")}


# ---------------------------------------------------------------------------
# Reading prompt files
# ---------------------------------------------------------------------------


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\ufeff# header\n\na red ball\n   \n  # indented comment\n  a blue star  \n", encoding="utf-8")
    items = read_prompt_file(path)
    assert [(i.where, i.fields) for i in items] == [("line 3", {"prompt": "a red ball"}), ("line 6", {"prompt": "a blue star"})]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".yaml"])
def test_structured_files_give_the_same_items(tmp_path, suffix):
    items = twenty_items()
    raw = read_prompt_file(write_prompt_file(tmp_path / f"p{suffix}", items))
    assert [r.fields for r in raw] == items


def test_bad_items_are_kept_as_failures(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"promt": "typo"}\nnot json\n{"prompt": "x", "steps": 2.5}\n'
                    '{"prompt": "x", "seconds": true}\n{"prompt": ""}\n"a bare string"\n[1]\n{"prompt": "s", "seed": -1}\n')
    raw = read_prompt_file(path)
    errors = [r.error for r in raw]
    assert errors[0] is None and raw[6].fields == {"prompt": "a bare string"}
    assert "unknown field 'promt'; did you mean 'prompt'?" in errors[1]
    assert "invalid JSON" in errors[2]
    assert "steps must be an integer" in errors[3]
    assert "seconds must be a number" in errors[4]
    assert "prompt is missing or empty" in errors[5]
    assert "expected a prompt or a mapping" in errors[7]
    assert "seed must be between 0" in errors[8]


def test_yaml_keys_that_are_not_text_fail_their_item(tmp_path):
    """YAML mapping keys may be numbers, dates or null, mixed with text keys; each such item fails naming the
    key (it was a traceback from sorting the keys)."""
    path = tmp_path / "p.yaml"
    path.write_text("- {prompt: a red ball, 1: b}\n- {2020-01-01: b}\n- {prompt: {1: a, b: 2}}\n- ok\n")
    raw = read_prompt_file(path)
    assert "unknown field '1'" in raw[0].error and "unknown field '2020-01-01'" in raw[1].error
    assert "prompt must be text" in raw[2].error and raw[3].error is None


def test_csv_cells_are_typed_and_empty_cells_unset(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,seconds,seed,steps\na red ball,1.5,,3\nblue,abc,1,\n\n", encoding="utf-8")
    raw = read_prompt_file(path)
    assert raw[0].fields == {"prompt": "a red ball", "seconds": 1.5, "steps": 3}
    assert "seconds must be a number" in raw[1].error and len(raw) == 2


@pytest.mark.parametrize(
    "name, text, fragment",
    [
        ("p.doc", "x", "must end in one of .txt, .jsonl, .csv, .yaml"),
        ("p.txt", "# only a comment\n", "holds no items"),
        ("p.csv", "prompt,sconds\nx,1\n", "unknown column 'sconds'; did you mean 'seconds'?"),
        ("p.csv", "text\nx\n", "include 'prompt'"),
        ("p.yaml", "prompt: x\n", "must hold a YAML list"),
        ("p.yaml", "- [unclosed\n", "malformed YAML"),
        ("p.csv", "prompt,prompt\na,b\n", "column 'prompt' is named twice"),
        ("p.csv", "prompt,steps\na red ball,2\n\"a blue ball, bouncing,2\nx,1\ny,1\n",
         "p.csv line 3: malformed CSV (unexpected end of data); a cell that opens a quote must close it"),
    ],
)
def test_bad_prompt_files_are_user_errors(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_prompt_file(path)
    assert fragment in str(err.value)


def test_a_csv_record_is_placed_at_its_first_line(tmp_path):
    """A quoted cell may span lines and blank lines may sit between records: `where` is the line a record starts on."""
    path = tmp_path / "p.csv"
    path.write_bytes(b'\r\n\r\nprompt,steps\r\n\r\n"two\nlines",1\r\n\r\n\r\nz,x\r\n')  # blank lines first too
    items = read_prompt_file(path)
    assert [(i.where, i.error) for i in items] == [("line 5", None), ("line 9", "steps must be an integer, got 'x'")]
    assert items[0].fields["prompt"] == "two\nlines"


def test_missing_prompt_file(tmp_path):
    with pytest.raises(UserError, match="prompt file not found"):
        read_prompt_file(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------
# Seeds, names, shards
# ---------------------------------------------------------------------------


def plan(tmp_path, items, base_seed=0, name="p.jsonl"):
    return plan_items(read_prompt_file(write_prompt_file(tmp_path / name, items)), base_seed)


def test_seeds_do_not_depend_on_order(tmp_path):
    items = twenty_items()
    first = {(json.dumps(i.fields, sort_keys=True), i.seed, i.key) for i in plan(tmp_path, items)}
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    assert {(json.dumps(i.fields, sort_keys=True), i.seed, i.key) for i in plan(tmp_path, shuffled)} == first


def test_seeds_explicit_derived_and_distinct(tmp_path):
    planned = plan(tmp_path, twenty_items())
    assert planned[2].seed == 7
    derived = [i.seed for i in planned if "seed" not in i.fields]
    assert len(set(derived)) == len(derived)  # the repeated item too
    assert planned[0].seed == derive_seed(0, planned[0].key)
    assert [i.seed for i in plan(tmp_path, twenty_items(), base_seed=1)][0] != planned[0].seed


def test_names_are_safe_and_unique(tmp_path):
    planned = plan(tmp_path, twenty_items())
    stems = [i.stem for i in planned]
    assert len({s.casefold() for s in stems}) == 20
    assert stems[6] == "escape-attempt" and stems[7] == "Clip-07"
    assert stems[0] == f"a-red-ball-bouncing_seed{planned[0].seed}"
    assert all("/" not in s and not s.startswith(".") for s in stems)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_disjoint_balanced_and_order_free(tmp_path, n):
    planned = plan(tmp_path, twenty_items())
    shards = [{i.key for i in shard_items(planned, (k, n))} for k in range(n)]
    assert set().union(*shards) == {i.key for i in planned}
    assert sum(len(s) for s in shards) == 20
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    reordered = planned[::-1]
    assert [{i.key for i in shard_items(reordered, (k, n))} for k in range(n)] == shards


def test_parse_shard_and_environment():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(UserError, match="--shard expects i/n"):
            parse_shard(bad)
    assert shard_from_environment({}) is None
    assert shard_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert shard_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4)
    with pytest.raises(UserError, match="RANK"):
        shard_from_environment({"WORLD_SIZE": "2"})


# ---------------------------------------------------------------------------
# Rendering in process
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".yaml"])
def test_twenty_prompts_render_from_each_file_format(tmp_path, suffix):
    items = twenty_items()
    prompts = write_prompt_file(tmp_path / f"p{suffix}", items)
    out = tmp_path / "out"
    result = run_batch(base_config(), prompts, out)
    records = manifest(out)
    assert len(result.rendered) == 20 and not result.failed
    assert len(records) == 20 and all(r["status"] == "ok" and files_intact(out, r) for r in records)
    assert {p.name for p in out.iterdir()} == expected_files(records) | {"manifest.shard-0-of-1.jsonl"}
    for item, rec in zip(items if suffix != ".txt" else [{"prompt": i["prompt"]} for i in items], records):
        assert rec["prompt"] == item["prompt"]
        frames = round(item.get("seconds", 1) * 4)
        assert rec["video"]["frames"] == frames == count_frames(out / rec["files"]["video"]["path"])
        sidecar = json.loads((out / rec["files"]["sidecar"]["path"]).read_text())
        assert rec["video"]["model_fps"] == sidecar["video"]["model_fps"] == 4  # base_config's rate, nothing resampled
        assert sidecar["seed"] == rec["seed"]
        assert sidecar["config"]["sampler"]["steps"] == item.get("steps", 2)
        assert sidecar["config"]["sampler"]["guidance"] == item.get("guidance", 4.0)
        assert sidecar["negative_prompt"] == item.get("negative_prompt", "")
    if suffix != ".txt":
        assert records[7]["name"] == "Clip-07" and (out / "Clip-07.mp4").is_file()


def test_a_shard_beyond_the_items_says_so(tmp_path, tiny_yaml, capsys):
    """More shards than items: a shard with none renders nothing, exits 0 (a launcher may start more processes
    than a short file has items) and says which shards get the items."""
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": p} for p in PROMPTS[:2]])
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml), "--shard", "5/10"], capsys)
    assert code == 0 and "0 rendered, 0 already done, 0 failed" in stdout
    assert "shard 5/10 has none of the file's 2 items: they are dealt to shards 0-1 only" in stdout
    assert not list(out.glob("*.mp4"))


def test_failures_are_isolated_and_summarised(tmp_path, tiny_yaml, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "good one"}\n{"prompt": "bad steps", "steps": 0}\n{"prompt": "too long", "seconds": 1e9}\n'
                       '{"promt": "typo"}\n{"prompt": "good two", "seconds": 0.5}\n')
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)], capsys)
    assert code == 1
    assert "2 rendered, 0 already done, 3 failed" in stdout
    assert "line 2 'bad steps': steps: must be between 1 and 1000" in stdout
    assert "line 3 'too long': seconds 1000000000 is above the maximum" in stdout
    assert "line 4: unknown field 'promt'" in stdout
    records = manifest(out)
    assert [r["status"] for r in records] == ["ok", "failed", "failed", "failed", "ok"]
    assert records[1]["error"].startswith("steps:")
    assert "failed: steps: must be between 1 and 1000" in (out / "index.html").read_text()
    # A rerun retries only the failures (they fail again) and keeps the finished ones.
    code, stdout, _ = run_cli(["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)], capsys)
    assert code == 1 and "0 rendered, 2 already done, 3 failed" in stdout


def test_resume_checks_files_and_config(tmp_path, tiny_yaml, capsys):
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": p} for p in PROMPTS[:4]])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    assert run_cli(args, capsys)[0] == 0
    records = manifest(out)
    first = out / records[0]["files"]["video"]["path"]
    good = first.read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}

    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "0 rendered, 4 already done" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes

    first.write_bytes(good[:-10] + b"x" * 10)  # same name, same size, wrong content
    (out / records[1]["files"]["poster"]["path"]).unlink()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "2 rendered, 2 already done" in stdout
    assert first.read_bytes() == good

    code, stdout, _ = run_cli(args + ["--steps", "3"], capsys)  # another resolved config: everything again
    assert code == 0 and "4 rendered, 0 already done" in stdout

    code, stdout, _ = run_cli(args + ["--steps", "3", "--format", "webm"], capsys)  # the mp4s are replaced, not kept
    assert code == 0 and "4 rendered" in stdout
    assert not list(out.glob("*.mp4")) and len(list(out.glob("*.webm"))) == 4
    assert {p.name for p in out.iterdir()} == expected_files(manifest(out)) | {"manifest.shard-0-of-1.jsonl"}


def test_resume_survives_edited_records_and_renamed_items(tmp_path, tiny_yaml, capsys):
    """A manifest is data: a record pointing at the folder itself, or of the wrong shape, is re-rendered and
    deletes nothing else; an item that takes over another's name never has its new files removed; a prompt with
    U+2028 is done once."""
    out = tmp_path / "out"
    prompts = write_prompt_file(tmp_path / "p.jsonl", [{"prompt": "a blue ball", "name": "clip"},
                                                       {"prompt": "a red ball\u2028a blue ball"}])
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    assert run_cli(args, capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    records = manifest(out)
    records[0]["files"]["poster"]["path"] = "."
    records[1]["video"] = None
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "manifest.shard-0-of-1.jsonl").unlink()
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "2 rendered, 0 already done" in stdout and (out / "notes.txt").read_text() == "mine"
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "0 rendered, 2 already done" in stdout  # the U+2028 prompt's record reads back whole

    write_prompt_file(prompts, [{"prompt": "a red cube", "name": "clip"}, {"prompt": "a blue ball", "name": "clip"}])
    code, stdout, _ = run_cli(args, capsys)
    records = manifest(out)
    assert code == 0 and [r["name"] for r in records] == ["clip", "clip-2"]
    assert all(r["status"] == "ok" and files_intact(out, r) for r in records)
    assert records[0]["prompt"] == "a red cube" and (out / "notes.txt").exists()


def test_the_prompt_file_is_not_the_manifest_batch_writes(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "out"
    out.mkdir()
    prompts = write_prompt_file(out / MANIFEST, [{"prompt": "a red ball"}])
    before = prompts.read_bytes()
    code, _, err = run_cli(["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)], capsys)
    assert code == 2 and "is the manifest.jsonl batch writes" in err and prompts.read_bytes() == before


def test_a_second_run_of_the_same_shard_is_refused(tmp_path, tiny_yaml, capsys):
    """Two runs of one shard into one folder would render the same items and rewrite one manifest: while one
    holds the shard (a real flock, as another process's would be), the second stops with one line; another
    shard goes on beside it, and a finished run leaves no lock file behind."""
    from soragen.batch import shard_lock, split_lock

    out = tmp_path / "out"
    out.mkdir()
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": "a red ball"}, {"prompt": "a blue ball"}])
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    with shard_lock(out, (0, 1)):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.strip() == (f"error: another soragen batch is rendering into {out}; wait for it to "
                                             "finish or stop it, then run this again (it goes on where that one stopped)")
        assert not (out / MANIFEST).exists()
    with split_lock(out, 2), shard_lock(out, (0, 2)):
        assert run_cli(args + ["--shard", "0/2"], capsys)[0] == 2
        assert run_cli(args + ["--shard", "1/2"], capsys)[0] == 0
        code, _, err = run_cli(args, capsys)  # split another way (0/1 covers 0/2's items): refused too
        assert code == 2 and "split as --shard i/2; batches rendering into one folder at the same time" in err
    assert run_cli(args, capsys)[0] == 0
    assert all(r["status"] == "ok" for r in manifest(out))
    assert not [p.name for p in out.iterdir() if p.name.endswith(".lock")]


def test_files_batch_did_not_write_are_never_overwritten(tmp_path, tiny_yaml, capsys):
    """A file of the user's named like an item's output fails that item, untouched; batch's own files (listed in a
    manifest, claimed before rendering, or with a soragen sidecar after the manifests were deleted) are replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "red.mp4").write_bytes(b"mine")
    prompts = write_prompt_file(tmp_path / "p.jsonl", [{"prompt": "a red ball", "name": "red"}, {"prompt": "a blue ball"}])
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and (out / "red.mp4").read_bytes() == b"mine"
    failed = {r["name"]: r for r in manifest(out)}["red"]
    assert failed["status"] == "failed" and failed["error"] == (
        f"{out / 'red.mp4'} is in the way: no batch manifest lists it; move it away or give the item another name")
    (out / "red.mp4").unlink()
    assert run_cli(args, capsys)[0] == 0
    for name in [MANIFEST, *(p.name for p in out.glob("manifest.shard-*"))]:
        (out / name).unlink()
    assert run_cli(args, capsys)[0] == 0  # its own files, known by their sidecars: rendered again
    assert all(r["status"] == "ok" for r in manifest(out))
    for f in out.iterdir():  # a video the user made with `soragen generate` under the item's name is theirs
        if f.is_file():
            f.unlink()
    assert run_cli(["generate", "a green star", "-c", str(tiny_yaml), "-o", str(out / "red.mp4")], capsys)[0] == 0
    mine = (out / "red.mp4").read_bytes()
    assert run_cli(args, capsys)[0] == 1 and (out / "red.mp4").read_bytes() == mine


def test_a_folder_where_a_listed_output_was_fails_that_item_naming_it(tmp_path, tiny_yaml, capsys):
    """A video batch wrote and a manifest lists, replaced by a folder: the item fails naming it and what to do (the
    message was generate's "choose another --output", a flag batch does not have), the folder untouched."""
    out = tmp_path / "out"
    prompts = write_prompt_file(tmp_path / "p.jsonl", [{"prompt": "a red ball", "name": "red"}])
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml), "--seed", "3"]
    assert run_cli(args, capsys)[0] == 0
    (out / "red.mp4").unlink()
    (out / "red.mp4").mkdir()
    (out / "red.mp4" / "keep.txt").write_text("mine")
    assert run_cli(args + ["--seed", "4"], capsys)[0] == 1
    assert manifest(out)[0]["error"] == (f"{out / 'red.mp4'} is in the way: it is a folder where the item's video "
                                         "goes; move it away or give the item another name")
    assert (out / "red.mp4" / "keep.txt").read_text() == "mine"
    (out / "red.mp4" / "keep.txt").unlink()
    (out / "red.mp4").rmdir()
    frames = args + ["--format", "frames"]
    assert run_cli(frames, capsys)[0] == 0 and (out / "red" / "frame_000000.png").is_file()
    (out / "red" / "notes.txt").write_text("mine")  # added to batch's own frames folder
    assert run_cli(frames + ["--seed", "5"], capsys)[0] == 1
    assert {r["name"]: r for r in manifest(out)}["red"]["error"] == (
        f"{out / 'red'} is in the way: it holds notes.txt, which no frames output writes; move that away or give the "
        "item another name")
    assert (out / "red" / "notes.txt").read_text() == "mine"


def test_accelerate_environment_picks_the_shard(tmp_path, tiny_yaml, capsys, monkeypatch):
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": p} for p in PROMPTS[:6]])
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, stdout, _ = run_cli(["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)], capsys)
    assert code == 0 and "batch (shard 1/2): 3 rendered" in stdout and "3/6 items done" in stdout
    assert (out / "manifest.shard-1-of-2.jsonl").is_file()
    assert [r["status"] for r in manifest(out)].count("pending") == 3


def test_bad_batch_arguments_are_one_line(tmp_path, tiny_yaml, capsys):
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": "x"}])
    (tmp_path / "file").write_text("")
    for args, fragment in [
        (["--out", str(tmp_path / "file")], "is a file"),
        (["--out", str(tmp_path / "o"), "--shard", "2/2"], "--shard expects i/n"),
        (["--out", str(tmp_path / "o"), "--seconds", "-1"], "--seconds (video.seconds) must be a positive"),
    ]:
        code, _, err = run_cli(["batch", str(prompts), "-c", str(tiny_yaml), *args], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


@pytest.mark.parametrize("fmt", ["gif", "frames", "webm"])
def test_other_formats_render_and_resume(tmp_path, fmt):
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": p} for p in PROMPTS[:2]])
    out = tmp_path / "out"
    result = run_batch(base_config(format=fmt), prompts, out)
    assert len(result.rendered) == 2
    records = manifest(out)
    assert all(r["status"] == "ok" and r["format"] == fmt and files_intact(out, r) for r in records)
    video = out / records[0]["files"]["video"]["path"]
    assert video.is_dir() == (fmt == "frames")
    assert 'class="card ok"' in (out / "index.html").read_text()
    assert len(run_batch(base_config(format=fmt), prompts, out).skipped) == 2
    if fmt == "frames":  # a frame changed inside the folder: the item is rendered again
        next(video.iterdir()).write_bytes(b"not a png")
        assert len(run_batch(base_config(format=fmt), prompts, out).rendered) == 1


def test_new_weights_in_the_same_model_folder_render_again(tmp_path, capsys):
    """A model trained on in place (a run's model/) keeps its folder's name and config: its weights' digest,
    recorded per item, makes the earlier videos stale."""
    import torch

    from soragen.model_io import WEIGHTS, save_model
    from soragen.pipeline import Pipeline
    from soragen.sampler import make_scheduler
    from safetensors.torch import load_file, save_file

    cfg = base_config()
    pipe = Pipeline.from_config(cfg)
    model = tmp_path / "model"
    save_model(model, cfg, pipe.text_encoder, pipe.vae, pipe.dit, make_scheduler(cfg.sampler))
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": "a red ball"}])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "--model", str(model), "--seconds", "1", "--fps", "4",
            "--width", "32", "--height", "32", "--steps", "2"]
    assert run_cli(args, capsys)[0] == 0
    assert run_cli(args, capsys)[1].count("0 rendered, 1 already done") == 1
    weights = model / "transformer" / WEIGHTS
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.01 * torch.randn_like(tensors[name])
    save_file(tensors, weights)
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "1 rendered, 0 already done" in stdout
    assert manifest(out)[0]["weights"] is not None


def test_a_failed_attempt_leaves_the_finished_videos_for_the_next_run(tmp_path, tiny_yaml, capsys, monkeypatch):
    """Run, then a run with other settings whose every item fails, then the first settings again: the first run's
    videos, still intact, are done (not rendered again) and the manifest and gallery say ok again."""
    import soragen.batch

    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": "a red ball"}, {"prompt": "a blue ball"}])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    assert run_cli(args, capsys)[0] == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}

    def out_of_memory(*a, **k):
        raise MemoryError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(soragen.batch, "render_item", out_of_memory)
        code, stdout, _ = run_cli(args + ["--steps", "3"], capsys)
    assert code == 1 and "0 rendered, 0 already done, 2 failed" in stdout
    assert [r["status"] for r in manifest(out)] == ["failed", "failed"]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "0 rendered, 2 already done" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes
    records = manifest(out)
    assert [r["status"] for r in records] == ["ok", "ok"] and all(files_intact(out, r) for r in records)
    assert "failed:" not in (out / "index.html").read_text()
    with monkeypatch.context() as m:  # failed again, then another format: the old videos are replaced, not left
        m.setattr(soragen.batch, "render_item", out_of_memory)
        assert run_cli(args + ["--steps", "3"], capsys)[0] == 1
    code, stdout, _ = run_cli(args + ["--format", "webm"], capsys)
    assert code == 0 and "2 rendered" in stdout
    assert not list(out.glob("*.mp4")) and len(list(out.glob("*.webm"))) == 2


def test_a_skipped_item_is_placed_where_it_now_is_in_the_prompt_file(tmp_path, tiny_yaml, capsys):
    prompts = write_prompt_file(tmp_path / "p.txt", [{"prompt": "a red ball"}, {"prompt": "a blue ball"}])
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--out", str(out), "-c", str(tiny_yaml)]
    assert run_cli(args, capsys)[0] == 0
    prompts.write_text("# more\na green ball\na red ball\na blue ball\n")
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and "1 rendered, 2 already done" in stdout
    records = manifest(out)
    assert [(r["index"], r["where"], r["prompt"]) for r in records] == [
        (0, "line 2", "a green ball"), (1, "line 3", "a red ball"), (2, "line 4", "a blue ball")]


@pytest.mark.parametrize("files", [{}, {"video": "x.mp4"}, {"video": {"path": 3}}, {"video": {"path": "x.mp4"}, "poster": None}])
def test_a_damaged_ok_record_counts_as_not_there(tmp_path, files):
    from soragen.batch import merge_manifests

    items = plan_items(read_prompt_file(write_prompt_file(tmp_path / "p.txt", [{"prompt": "a red ball"}])), 0)
    out = tmp_path / "out"
    out.mkdir()
    rec = {"key": items[0].key, "index": 0, "where": "line 1", "name": items[0].stem, "prompt": "a red ball",
           "status": "ok", "finished_at": "2026-01-01", "files": files, "video": {}, "timings_seconds": {}}
    (out / "manifest.shard-1-of-2.jsonl").write_text(json.dumps(rec) + "\n")
    assert read_records(out / "manifest.shard-1-of-2.jsonl") == []
    assert [r["status"] for r in merge_manifests(out, items, "t")] == ["pending"]


def test_prompt_files_python_will_not_read_are_one_line(tmp_path, tiny_yaml, capsys):
    """A number of over 4300 digits (Python's limit on int from text), a YAML anchor holding itself."""
    big = tmp_path / "big.jsonl"
    big.write_text('{"prompt": "a red ball", "seed": ' + "9" * 5000 + '}\n{"prompt": "a blue ball"}\n')
    items = read_prompt_file(big)
    assert items[0].error.startswith("unreadable JSON: Exceeds the limit") and items[1].error is None
    for text, fragment in (("- &a [*a]\n", None), ("- &a {prompt: x, name: *a}\n", None),
                           ("- {prompt: x, seed: " + "9" * 5000 + "}\n", "cannot be read as a list of items")):
        path = tmp_path / "r.yaml"
        path.write_text(text)
        code, stdout, err = run_cli(["batch", str(path), "--out", str(tmp_path / "o"), "-c", str(tiny_yaml)], capsys)
        assert code in (1, 2) and "Traceback" not in err + stdout, (text, err)
        if fragment:
            assert code == 2 and fragment in err
