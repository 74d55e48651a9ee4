"""`soragen batch`: render a whole prompt file into a folder you can browse, resumably.

Stages of a run, in order:
1. Read the prompt file (.txt, .jsonl, .csv, .yaml) into items; a malformed item is
   kept, so it is reported as failed instead of stopping the batch.
2. Plan: each item gets a key (a hash of its fields), a seed (its own, or derived from
   the base seed and its key, so it never depends on order or sharding), a unique file
   stem and a shard (items sorted by key, dealt round-robin to the n shards).
3. Render this shard's items, skipping those the manifests record as done with the same
   resolved config *and* whose files still hash to the recorded values.
4. After each item the shard's own manifest, DIR/manifest.shard-I-of-N.jsonl, is
   rewritten atomically; every so often and at the end, all shard manifests are merged
   (under a lock on DIR) into DIR/manifest.jsonl and DIR/index.html.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no flock; shards should not finish at the same moment there)
    fcntl = None

from soragen import __version__
from soragen.config import MAX_SEED, Config, read_text, text_lines, update
from soragen.errors import UserError

FIELDS = ("prompt", "seconds", "seed", "guidance", "steps", "negative_prompt", "name")
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".csv", ".yaml", ".yml")
MANIFEST = "manifest.jsonl"
MERGE_EVERY_SECONDS = 10.0  # shortest time between two merges of the manifests during a run


# ---------------------------------------------------------------------------
# 1. Reading prompt files
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RawItem:
    """One entry of a prompt file, before checking: its fields, or why it could not be read."""

    index: int  # position among the file's items (0-based)
    where: str  # "line 7" (text, JSONL, CSV: where the record begins) or "item 4" (YAML), for messages
    fields: dict[str, Any] | None  # as given (CSV cells already typed)
    error: str | None = None  # set when the entry is unreadable
    raw: str = ""  # the entry's text, for the key of an unreadable entry


def _number(value: Any, name: str, kind: type) -> int | float:
    if isinstance(value, str):  # CSV cells
        try:
            value = kind(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_fields(data: Any) -> dict[str, Any]:
    """Check one item's fields (a mapping, or a bare prompt string); raise ValueError naming the bad field."""
    if isinstance(data, str):
        data = {"prompt": data}
    if not isinstance(data, dict):
        raise ValueError(f"expected a prompt or a mapping of fields ({', '.join(FIELDS)}), got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown field '{key}'; {hint}valid fields: {', '.join(FIELDS)}")
        if value is None or (isinstance(value, str) and not value.strip() and key != "negative_prompt"):
            continue  # a null or empty text: not given (an empty negative_prompt is given: no negative prompt)
        match key:
            case "prompt" | "negative_prompt" | "name":
                if not isinstance(value, str):
                    raise ValueError(f"{key} must be text, got {value!r}")
                out[key] = value.strip()
            case "seconds" | "guidance":
                out[key] = _number(value, key, float)
            case "seed" | "steps":
                out[key] = _number(value, key, int)
    if not out.get("prompt"):
        raise ValueError("prompt is missing or empty; every item needs a prompt")
    if "seed" in out and not 0 <= out["seed"] <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {out['seed']}")
    return out


def _item(index: int, where: str, data: Any, raw: str) -> RawItem:
    try:
        return RawItem(index, where, check_fields(data), raw=raw)
    except ValueError as e:
        return RawItem(index, where, None, str(e), raw)


def _read_txt(text: str) -> list[RawItem]:
    items = []
    for n, line in enumerate(text_lines(text), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            items.append(_item(len(items), f"line {n}", line, line))
    return items


def _read_jsonl(text: str) -> list[RawItem]:
    items = []
    for n, line in enumerate(text_lines(text), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            items.append(RawItem(len(items), f"line {n}", None, f"invalid JSON: {e.msg} (column {e.colno})", line))
            continue
        except (ValueError, RecursionError) as e:  # a number of over 4300 digits; nesting deeper than Python's stack
            items.append(RawItem(len(items), f"line {n}", None, f"unreadable JSON: {e}", line))
            continue
        items.append(_item(len(items), f"line {n}", data, line))
    return items


class _LineSource:
    """The lines of a text for csv, remembering which it has handed out since `start()`: a record's first line
    (a quoted cell may span several, and blank lines between records are skipped)."""

    def __init__(self, text: str):
        lines = list(enumerate(io.StringIO(text, newline=""), 1))
        while lines and not lines[0][1].strip():  # blank lines before the header row
            lines.pop(0)
        self._lines = iter(lines)
        self._read: list[tuple[int, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        n, line = next(self._lines)
        self._read.append((n, line))
        return line

    def start(self) -> None:
        self._read.clear()

    def first_line(self) -> int:
        """Number of the first non-blank line read since start() (the last line read if all were blank)."""
        return next((n for n, line in self._read if line.strip()), self._read[-1][0] if self._read else 1)


def _read_csv(text: str, path: Path) -> list[RawItem]:
    source = _LineSource(text)
    reader = csv.DictReader(source, strict=True)  # strict: an unclosed quote is an error, not the rest of the file
    try:
        return _csv_items(reader, source, path)
    except csv.Error as e:
        raise UserError(f"{path} line {source.first_line()}: malformed CSV ({e}); a cell that opens a quote must "
                        "close it") from None


def _csv_items(reader: csv.DictReader, source: _LineSource, path: Path) -> list[RawItem]:
    header = [h.strip() for h in (reader.fieldnames or [])]
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise UserError(f"{path}: column '{doubled[0]}' is named twice; name each column once")
    if "prompt" not in header:
        raise UserError(f"{path}: the first row must name the columns and include 'prompt' (valid: {', '.join(FIELDS)}), got {header}")
    for h in header:
        if h not in FIELDS:
            close = difflib.get_close_matches(h, FIELDS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"{path}: unknown column '{h}'; {hint}valid columns: {', '.join(FIELDS)}")
    reader.fieldnames = header
    items = []
    source.start()
    for row in reader:
        where = f"line {source.first_line()}"  # where the record begins
        source.start()
        if None in row:  # more cells than columns
            items.append(RawItem(len(items), where, None, f"{len(header) + len(row[None])} cells but {len(header)} columns", str(row)))
            continue
        cells = {k: v for k, v in row.items() if v is not None and v.strip()}  # an empty cell: not given
        if not cells:
            continue  # a blank row
        items.append(_item(len(items), where, cells, json.dumps(cells, sort_keys=True)))
    return items


def _read_yaml(text: str, path: Path) -> list[RawItem]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is malformed YAML{at}: {getattr(e, 'problem', None) or 'invalid YAML'}") from None
    except (ValueError, RecursionError) as e:  # a number of over 4300 digits; an anchor that holds itself
        raise UserError(f"{path} cannot be read as a list of items: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"{path} must hold a YAML list of items (each a prompt or a mapping of {', '.join(FIELDS)}), "
                        f"got {type(data).__name__}")
    items = []
    for n, entry in enumerate(data):
        if isinstance(entry, dict):  # YAML keys may be numbers, dates or null: a field name is text
            entry = {str(k): v for k, v in entry.items()}
        try:
            identity = json.dumps(entry, sort_keys=True, default=str)
        except (TypeError, ValueError, RecursionError):  # keys of mixed types deeper in a value, a value that holds
            identity = repr(entry)  # itself (YAML anchors): its text stands for it
        items.append(_item(n, f"item {n + 1}", entry, identity))
    return items


def read_prompt_file(path: Path) -> list[RawItem]:
    """The items of a prompt file (.txt: a prompt a line, `#` comments; .jsonl, .csv, .yaml: fields per item)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise UserError(f"prompt file {path} must end in one of {', '.join(PROMPT_FILE_SUFFIXES)}")
    text = read_text(path, "prompt file")
    match suffix:
        case ".txt":
            items = _read_txt(text)
        case ".jsonl":
            items = _read_jsonl(text)
        case ".csv":
            items = _read_csv(text, path)
        case _:
            items = _read_yaml(text, path)
    if not items:
        raise UserError(f"prompt file {path} holds no items")
    return items


# ---------------------------------------------------------------------------
# 2. Planning: keys, seeds, names, shards
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One video to render (or an entry that fails), with everything derived from the prompt file."""

    index: int
    where: str
    key: str  # identity: a hash of the item's fields (and of its repeat number among identical items)
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seed: int | None = None  # the seed it renders with (None when unreadable)
    stem: str = ""  # file name of its outputs, without suffix


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def derive_seed(base_seed: int, key: str) -> int:
    """The seed of an item without its own: a hash of the base seed and the item's key (0 <= seed < 2**31)."""
    return int(_sha(f"soragen-batch-seed:{base_seed}:{key}")[:8], 16) & 0x7FFFFFFF


def plan_items(raw: list[RawItem], base_seed: int) -> list[Item]:
    """Keys, seeds and unique file stems of all items (the same on every shard)."""
    from soragen.naming import safe_stem, slugify, unique_stems

    repeats: dict[str, int] = {}
    items = []
    for r in raw:
        identity = json.dumps(r.fields, sort_keys=True, ensure_ascii=False) if r.fields is not None else "unreadable:" + r.raw
        n = repeats.get(identity, 0)  # identical items are told apart by how many came before
        repeats[identity] = n + 1
        key = _sha(f"{identity}\n{n}")[:20]
        if r.fields is None:
            items.append(Item(r.index, r.where, key, error=r.error, stem=f"item-{r.index + 1}"))
            continue
        seed = r.fields["seed"] if "seed" in r.fields else derive_seed(base_seed, key)
        stem = safe_stem(r.fields["name"]) if "name" in r.fields else f"{slugify(r.fields['prompt'], 48)}_seed{seed}"
        items.append(Item(r.index, r.where, key, r.fields, None, seed, stem))
    stems = iter(unique_stems(i.stem for i in items if i.error is None))  # unreadable items write no files
    return [i if i.error is not None else Item(i.index, i.where, i.key, i.fields, None, i.seed, next(stems)) for i in items]


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard expects i/n with 0 <= i < n (e.g. --shard 0/2 and --shard 1/2), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def shard_from_environment(env: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(process index, process count) under `accelerate launch` / torchrun (RANK, WORLD_SIZE), else None."""
    env = os.environ if env is None else env
    world, rank = env.get("WORLD_SIZE"), env.get("RANK")
    if not world or not world.strip().isdigit() or int(world) <= 1:
        return None
    if rank is None or not rank.strip().isdigit() or int(rank) >= int(world):
        raise UserError(f"WORLD_SIZE={world} but RANK={rank!r} is not a process index below it; pass --shard i/n")
    return int(rank), int(world)


def shard_items(items: list[Item], shard: tuple[int, int]) -> list[Item]:
    """This shard's items, in file order: items sorted by key are dealt round-robin, so shards are disjoint and balanced."""
    i, n = shard
    mine = {item.key for pos, item in enumerate(sorted(items, key=lambda it: it.key)) if pos % n == i}
    return [item for item in items if item.key in mine]


# ---------------------------------------------------------------------------
# 3. Manifests
# ---------------------------------------------------------------------------


def shard_manifest_name(shard: tuple[int, int]) -> str:
    """manifest.shard-I-of-N.jsonl: the records one shard writes (only that shard's process writes it)."""
    return f"manifest.shard-{shard[0]}-of-{shard[1]}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL manifest; a line that does not parse is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    out = []
    for line in text_lines(text):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or a number or nesting Python will not read
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str) and _well_formed(rec):
            out.append(rec)
    return out


def _well_formed(rec: dict[str, Any]) -> bool:
    """Whether a record has the fields the gallery and the resume read, of the right types (a manifest is data:
    an edited or damaged record counts as not there, and its item is rendered again)."""
    text = all(isinstance(rec.get(k, ""), str) for k in ("name", "prompt", "where", "status", "finished_at"))
    if rec.get("status") != "ok":
        return text
    files = rec.get("files")
    return (text and all(isinstance(rec.get(k), dict) for k in ("files", "video", "timings_seconds"))
            and "video" in files and all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in files.values()))


def manifest_records(folder: Path) -> list[dict[str, Any]]:
    """The records of every manifest in folder: the merged one, then each shard's."""
    paths = [folder / MANIFEST] + sorted(folder.glob("manifest.shard-*-of-*.jsonl"))
    return [rec for path in paths for rec in read_records(path)]


def latest_records(records: list[dict[str, Any]], statuses: tuple[str, ...] = ("ok", "failed")) -> dict[str, dict[str, Any]]:
    """The newest finished (ok or failed; or only those of `statuses`) record per item key."""
    best: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec.get("status") not in statuses:
            continue
        old = best.get(rec["key"])
        if old is None or str(rec.get("finished_at", "")) > str(old.get("finished_at", "")):
            best[rec["key"]] = rec
    return best


def kept_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ok records that failed records keep (`done_before`: the item's files from before the failed attempt)."""
    kept = [(rec, rec.get("done_before")) for rec in records if rec.get("status") == "failed"]
    return [k for rec, k in kept if isinstance(k, dict) and k.get("key") == rec.get("key") and k.get("status") == "ok"
            and _well_formed(k)]


def done_records(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The newest ok record per item key, those that failed records keep included."""
    return latest_records(records + kept_records(records), ("ok",))


def listed_names(records: list[dict[str, Any]]) -> set[str]:
    """Every file path (relative to the folder) that a record lists: what batch wrote there, or claimed before
    writing."""
    names: set[str] = set()
    for rec in records + kept_records(records):
        files = rec.get("files")
        if isinstance(files, dict):
            names.update(e["path"] for e in files.values() if isinstance(e, dict) and isinstance(e.get("path"), str))
    return names


def foreign_files(folder: Path, names: dict[str, str], listed: set[str], key: str) -> list[str]:
    """An item's output names (by role) that exist in folder but that batch did not write for it: no manifest
    lists them, and the sidecar there is not the one batch wrote for item `key` (with the manifests deleted, an
    item's files stay its own; a video made by `soragen generate` under that name is not)."""
    from soragen.video_io import read_sidecar

    present = [n for n in names.values() if (folder / n).exists() and n not in listed]
    if present and (read_sidecar(folder / names["video"]) or {}).get("batch_item") == key:
        return []
    return present


def file_entry(folder: Path, path: Path) -> dict[str, Any]:
    """{path (relative to folder), bytes, sha256} of a file, or of a frames folder (hash over its files' names and hashes)."""
    if path.is_dir():
        h, size = hashlib.sha256(), 0
        for f in sorted(path.iterdir()):
            data = f.read_bytes()
            size += len(data)
            h.update(f"{f.name} {hashlib.sha256(data).hexdigest()}\n".encode())
        digest = h.hexdigest()
    else:
        data = path.read_bytes()
        size, digest = len(data), hashlib.sha256(data).hexdigest()
    return {"path": path.relative_to(folder).as_posix(), "bytes": size, "sha256": digest}


def _inside(folder: Path, rel: Any) -> Path | None:
    """folder/rel if rel is a plain relative path inside folder, else None (a manifest is data, not trusted paths)."""
    if not isinstance(rel, str) or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        return None
    return folder / rel


def files_intact(folder: Path, rec: dict[str, Any]) -> bool:
    """Whether every file a record lists exists with the recorded size and hash."""
    files = rec.get("files")
    if not isinstance(files, dict) or "video" not in files:
        return False
    for entry in files.values():
        path = _inside(folder, entry.get("path")) if isinstance(entry, dict) else None
        if path is None or not path.exists():
            return False
        try:
            if file_entry(folder, path) != entry:
                return False
        except OSError:
            return False
    return True


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder itself (flock on its descriptor: no lock file to leave behind)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextmanager
def shard_lock(folder: Path, shard: tuple[int, int]) -> Iterator[None]:
    """Refuse a second run of the same shard into folder while one runs: both would render the same items
    and rewrite one manifest. The lock is a hidden file held with flock, removed at the end (a killed run's
    is unlocked by the kernel and taken over)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = folder / f".{shard_manifest_name(shard)}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            which = "" if shard == (0, 1) else f"shard {shard[0]}/{shard[1]} "
            raise UserError(f"another soragen batch is rendering {which}into {folder}; wait for it to finish or stop "
                            "it, then run this again (it goes on where that one stopped)") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the lock file of a run that removed it as it ended: take a fresh one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextmanager
def split_lock(folder: Path, n: int) -> Iterator[None]:
    """Refuse to render into folder while a batch split another way (--shard i/m, m != n) renders there: their
    shards overlap. Each run holds a shared flock on a hidden file for its split and probes the others'."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path = folder / f".batch-split-{n}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        for other in sorted(folder.glob(".batch-split-*.lock")):
            if other.name == path.name:
                continue
            try:
                probe = os.open(other, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken at once: nobody renders with that split
            except BlockingIOError:
                m = other.name.removeprefix(".batch-split-").removesuffix(".lock")
                raise UserError(f"another soragen batch is rendering into {folder} split as --shard i/{m}; batches "
                                f"rendering into one folder at the same time must split it the same way (--shard "
                                f"i/{m}), or wait for it to finish") from None
            finally:
                os.close(probe)
        try:
            yield
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last of its split: tidy up
                path.unlink(missing_ok=True)
            except BlockingIOError:
                pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, names: list[str]) -> int:
    """Delete temporary files (.NAME.*.partial) left by a killed run for these final names; returns how many."""
    from soragen.video_io import remove_path, temporaries

    found = [tmp for name in names for tmp in temporaries(folder / name)]
    for tmp in found:
        remove_path(tmp)
    return len(found)


def merge_manifests(folder: Path, items: list[Item], title: str) -> list[dict[str, Any]]:
    """Merge every shard manifest into folder/manifest.jsonl (one record per item, file order) and rewrite index.html.

    Runs under the folder lock, so shards finishing side by side never lose each other's records.
    """
    from soragen.gallery import write_index
    from soragen.video_io import write_text

    with folder_lock(folder):
        remove_stale_temporaries(folder, [MANIFEST, "index.html"])
        latest = latest_records(manifest_records(folder))
        merged = []
        for item in items:
            rec = latest.get(item.key)
            if rec is None:
                rec = {"key": item.key, "index": item.index, "where": item.where, "name": item.stem,
                       "prompt": item.fields.get("prompt", ""), "seed": item.seed, "status": "pending", "error": None}
            else:  # where the item is now: lines added above it since it was rendered moved it
                rec = {**rec, "index": item.index, "where": item.where}
            merged.append(rec)
        write_text(folder / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged))
        write_index(folder, merged, title)
    return merged


# ---------------------------------------------------------------------------
# 4. Rendering
# ---------------------------------------------------------------------------


def item_config(base: Config, item: Item) -> Config:
    """The resolved config of one item: the base config with the item's fields and seed."""
    f = item.fields
    video = {"seconds": f["seconds"]} if "seconds" in f else {}
    sampler = {k: f[k] for k in ("guidance", "steps", "negative_prompt") if k in f}
    if "steps" in f:  # an item's steps are those of every window, as --steps
        sampler["continuation_steps"] = None
    try:
        return update(base, seed=item.seed, video=video, sampler=sampler)
    except UserError as e:
        # "config key 'sampler.steps': ..." -> "steps: ..." (the field the user wrote)
        msg = re.sub(r"^config key '(?:video|sampler)\.(\w+)'", r"\1", str(e))
        raise UserError(msg) from None


class Reporter:
    """What a batch tells its caller; the CLI draws progress bars with it. Every method may be left as is."""

    def start(self, total: int, shard: tuple[int, int]) -> None:
        """The run begins: `total` items in this shard."""

    def item_start(self, item: Item, steps: int) -> None:
        """An item starts rendering: `steps` denoising steps in all."""

    def step(self, done: int) -> None:
        """`done` denoising steps of the current item are finished."""

    def item_end(self, item: Item, status: str, rec: dict[str, Any] | None) -> None:
        """An item is done: status is ok, failed or skipped."""


@dataclass
class BatchResult:
    """What one run did, for the summary."""

    shard: tuple[int, int]
    rendered: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    failed: list[tuple[Item, str]] = field(default_factory=list)
    manifest: list[dict[str, Any]] = field(default_factory=list)  # the merged manifest at the end
    seconds: float = 0.0
    items: int = 0  # the prompt file's items, every shard's


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def output_names(item: Item, fmt: str) -> dict[str, str]:
    """File names of an item's outputs, by role: video, sidecar, poster, contact_sheet."""
    from soragen.video_io import SUFFIXES, sidecar_path

    video = item.stem + SUFFIXES[fmt]
    return {"video": video, "sidecar": sidecar_path(Path(video)).name,
            "poster": f"{item.stem}.poster.png", "contact_sheet": f"{item.stem}.sheet.png"}


def render_item(pipe, cfg: Config, item: Item, folder: Path, reporter: Reporter, weights: str | None = None) -> dict[str, Any]:
    """Render one item: video, sidecar, poster and contact sheet; returns its manifest record (status ok).
    `weights`: the model folder's `model_io.weights_digest`, recorded for the resume."""
    from soragen.gallery import FrameSampler
    from soragen.pipeline import Pipeline, plan_video
    from soragen.video_io import write_png

    t0 = time.perf_counter()
    plan = plan_video(cfg)
    item_pipe = Pipeline(cfg, pipe.text_encoder, pipe.vae, pipe.dit, pipe.model_name)  # same models, item's settings
    reporter.item_start(item, item_pipe.denoise_calls(plan))
    names = output_names(item, cfg.video.format)
    frames = FrameSampler(plan.num_frames, cfg.video.fps)
    sidecar = item_pipe.generate(item.fields["prompt"], folder / names["video"], overwrite=True,
                                 on_step=lambda i: reporter.step(i + 1), on_frames=frames.add,
                                 sidecar_extra={"batch_item": item.key})
    t1 = time.perf_counter()
    write_png(folder / names["poster"], frames.poster())
    write_png(folder / names["contact_sheet"], frames.sheet())
    timings = dict(sidecar["timings_seconds"])
    timings["previews"] = round(time.perf_counter() - t1, 4)
    timings["total"] = round(time.perf_counter() - t0, 4)
    return {
        "key": item.key,
        "index": item.index,
        "where": item.where,
        "name": item.stem,
        "prompt": item.fields["prompt"],
        "negative_prompt": cfg.sampler.negative_prompt,
        "seed": item.seed,
        "seed_from": "item" if "seed" in item.fields else "derived",
        "config_hash": cfg.digest(),
        "model": pipe.model_name,
        "weights": weights,
        "format": cfg.video.format,
        "files": {role: file_entry(folder, folder / name) for role, name in names.items()},
        "video": {k: sidecar["video"][k] for k in ("seconds", "frames", "fps", "model_fps", "width", "height")},
        "timings_seconds": timings,
        "status": "ok",
        "error": None,
    }


def _remove_replaced(folder: Path, old: dict[str, Any] | None, new: dict[str, Any], taken: set[str]) -> None:
    """Delete files an item's earlier record listed that its new outputs no longer use (e.g. after --format changed),
    but none that another item of the prompt file is now named for (`taken`: after a rename, its files)."""
    import shutil

    if not old or not isinstance(old.get("files"), dict):
        return
    keep = {e["path"] for e in new.get("files", {}).values()} | taken
    for entry in old["files"].values():
        rel = entry.get("path") if isinstance(entry, dict) else None
        path = _inside(folder, rel)
        if path is not None and "/" not in rel and rel not in keep and path.exists():  # outputs sit in the folder itself
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class ModelError(UserError):
    """The model named for the whole batch cannot be loaded: no item can render."""


def run_batch(
    cfg: Config,
    prompt_file: Path,
    folder: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    reporter: Reporter | None = None,
) -> BatchResult:
    """Render the prompt file's items of this shard into folder; resume where an earlier run stopped."""
    from soragen.pipeline import plan_video

    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    items = plan_items(read_prompt_file(prompt_file), cfg.seed)
    plan_video(cfg)  # a bad base request fails now, before any model loads
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; give a folder")
    given = Path(prompt_file).resolve()
    if given.parent == folder.resolve() and (given.name in (MANIFEST, "index.html")
                                             or re.fullmatch(r"manifest\.shard-\d+-of-\d+\.jsonl", given.name)):
        raise UserError(f"the prompt file {prompt_file} is the {given.name} batch writes in --out {folder}; "
                        "copy it elsewhere or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"output folder {folder} is not writable; choose another --out")

    with split_lock(folder, shard[1]), shard_lock(folder, shard):
        return _render_shard(cfg, items, folder, shard, reporter, f"soragen batch: {Path(prompt_file).name}", t_start)


def _render_shard(cfg: Config, items: list[Item], folder: Path, shard: tuple[int, int], reporter: Reporter,
                  title: str, t_start: float) -> BatchResult:
    """run_batch's work once its checks passed and it holds the shard's lock."""
    from soragen.model_io import weights_digest
    from soragen.pipeline import Pipeline, plan_video
    from soragen.video_io import SUFFIXES, not_frames, write_text

    mine = shard_items(items, shard)
    own_manifest = folder / shard_manifest_name(shard)
    # Only this process writes this shard's files, so their leftovers are safe to delete.
    fmt = cfg.video.format
    own_names = [own_manifest.name] + [n for it in mine for n in output_names(it, fmt).values()]
    owner = {n: it.key for it in items if it.error is None for f in SUFFIXES for n in output_names(it, f).values()}
    remove_stale_temporaries(folder, own_names)
    own = {r["key"]: r for r in read_records(own_manifest)}
    records = manifest_records(folder)  # read once: what is done, and which files are batch's
    known, listed = latest_records(records), listed_names(records)
    done = done_records(records)  # an item's newest ok record: a later failed attempt leaves its files
    try:
        weights = weights_digest(cfg.model)  # new weights in the same model folder make every video stale
    except UserError as e:
        raise ModelError(str(e)) from None
    result = BatchResult(shard, items=len(items))
    pipe = None
    last_merge = time.perf_counter()
    reporter.start(len(mine), shard)
    try:
        for item in mine:
            try:
                if item.error is not None:
                    raise UserError(item.error)
                item_cfg = item_config(cfg, item)
                old = done.get(item.key)
                if (old is not None and old.get("config_hash") == item_cfg.digest() and old.get("weights") == weights
                        and old.get("name") == item.stem and files_intact(folder, old)):
                    if known.get(item.key) is not old:  # a failed attempt since: the item is done again as it was
                        old = own[item.key] = known[item.key] = {**old, "finished_at": _now()}
                        write_text(own_manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in own.values()))
                    result.skipped.append(item)
                    reporter.item_end(item, "skipped", old)
                    continue
                try:
                    plan_video(item_cfg)  # an item's bad seconds fail before the model loads
                except UserError as e:
                    raise UserError(re.sub(r"^--(\w+)", r"\1", str(e))) from None  # name the item's field, not the flag
                names = output_names(item, item_cfg.video.format)
                foreign = foreign_files(folder, names, listed, item.key)
                if foreign:
                    raise UserError(f"{folder / foreign[0]} is in the way: no batch manifest lists it; move it away "
                                    "or give the item another name")
                for role, name in names.items():  # one batch wrote, since replaced by a folder (or the other way)
                    path = folder / name
                    frames = role == "video" and item_cfg.video.format == "frames"
                    if path.exists() and path.is_dir() != frames:
                        raise UserError(f"{path} is in the way: it is a {'folder' if path.is_dir() else 'file'} where "
                                        f"the item's {role.replace('_', ' ')} goes; move it away or give the item "
                                        "another name")
                    if frames and path.is_dir() and (others := not_frames(path)):  # batch's frames, and a file added
                        raise UserError(f"{path} is in the way: it holds {others[0]}, which no frames output writes; "
                                        "move that away or give the item another name")
                if pipe is None:
                    try:
                        pipe = Pipeline.from_config(cfg)
                    except UserError as e:  # the command's model, not this item: stop with one line, exit 2
                        raise ModelError(str(e)) from None
                # Its names claimed before its first file: a run stopped after the video lands but before the
                # record knows them as batch's own.
                own[item.key] = {"key": item.key, "index": item.index, "where": item.where, "name": item.stem,
                                 "prompt": item.fields["prompt"], "seed": item.seed, "status": "rendering",
                                 "error": None, "files": {role: {"path": n} for role, n in names.items()}}
                listed.update(names.values())
                write_text(own_manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in own.values()))
                rec = render_item(pipe, item_cfg, item, folder, reporter, weights)
                _remove_replaced(folder, old, rec, {n for n, key in owner.items() if key != item.key})
                result.rendered.append(item)
                status = "ok"
            except ModelError:
                raise
            except Exception as e:  # noqa: BLE001  an item's failure never stops the others (Ctrl-C still does)
                message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                rec = {"key": item.key, "index": item.index, "where": item.where, "name": item.stem,
                       "prompt": item.fields.get("prompt", ""), "seed": item.seed, "status": "failed", "error": message}
                if item.key in done:  # its files from before stay (and a run with the settings they had keeps them)
                    rec["done_before"] = done[item.key]  # an ok record: it holds none itself
                result.failed.append((item, message))
                status = "failed"
            rec.update(shard=f"{shard[0]}/{shard[1]}", finished_at=_now(), soragen_version=__version__)
            own[item.key] = known[item.key] = rec
            if status == "ok":
                done[item.key] = rec
            write_text(own_manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in own.values()))
            reporter.item_end(item, status, rec)
            if time.perf_counter() - last_merge > MERGE_EVERY_SECONDS:
                merge_manifests(folder, items, title)
                last_merge = time.perf_counter()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: finished items stay, nothing half-written does
        remove_stale_temporaries(folder, own_names)
        raise
    finally:
        result.manifest = merge_manifests(folder, items, title)
    result.seconds = time.perf_counter() - t_start
    return result
