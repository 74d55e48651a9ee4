"""Posters, contact sheets and index.html; the gallery opened from disk in headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import imageio.v2 as imageio
import numpy as np
import pytest

from soragen.batch import MANIFEST, read_records, run_batch
from soragen.gallery import FrameSampler, contact_sheet, render_index, sheet_indices, timestamp

from conftest import tiny_config

HOSTILE = 'a <script>alert("x")</script> & "quotes" 一位女士'


def batch_config(**video):
    return tiny_config(video={"seconds": 1, **video}, sampler={"steps": 2})


def test_sheet_indices_and_timestamps():
    assert sheet_indices(5) == [0, 1, 2, 3, 4]
    picks = sheet_indices(100)
    assert len(picks) == 12 and picks[0] == 0 and picks[-1] == 99
    assert timestamp(0) == "0:00.00" and timestamp(1.5) == "0:01.50" and timestamp(75.25) == "1:15.25"


def test_contact_sheet_is_a_grid_with_labels():
    frames = [(i / 8, np.full((64, 32, 3), 40 * i, dtype=np.uint8)) for i in range(6)]
    sheet = contact_sheet(frames, columns=4, tile_width=96)  # tiles 96x192, 2 rows
    assert sheet.dtype == np.uint8 and sheet.ndim == 3
    assert sheet.shape[1] == 4 * (96 + 4) + 4 and sheet.shape[0] == 2 * (192 + 18 + 4) + 4
    assert (sheet[4:196, 104:200] == 40).all()  # the second frame, enlarged by nearest neighbour
    label = sheet[4 + 192 : 4 + 192 + 18, 4:100]
    assert (label > 200).any()  # a time stamp was drawn under the first tile


def test_frame_sampler_keeps_only_what_it_needs():
    sampler = FrameSampler(num_frames=40, fps=8)
    for start in range(0, 40, 9):
        chunk = np.arange(start, min(start + 9, 40), dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
        sampler.add(chunk)
    assert sampler.poster()[0, 0, 0] == 20
    assert len(sampler.kept) <= 13
    assert sampler.sheet().shape[0] > 0


def test_index_escapes_prompts_and_uses_relative_links():
    rec = {
        "key": "k", "name": 'we"ird <name>', "prompt": HOSTILE, "seed": 3, "status": "ok", "format": "mp4", "where": "line 1",
        "files": {"video": {"path": "a b#1.mp4"}, "poster": {"path": "a b#1.poster.png"},
                  "contact_sheet": {"path": "a b#1.sheet.png"}, "sidecar": {"path": "a b#1.json"}},
        "video": {"seconds": 1.0, "fps": 8, "width": 64, "height": 64}, "timings_seconds": {"denoising": 0.5},
    }
    failed = {"key": "f", "prompt": "<b>bad</b>", "seed": 1, "status": "failed", "error": "steps: <0>", "where": "line 2"}
    unreadable = {"key": "u", "prompt": "", "seed": None, "status": "failed", "error": "invalid JSON", "where": "line 3"}
    page = render_index([rec, failed, unreadable], "t <1>")
    assert "line 2 · seed 1" in page and "line 3</div>" in page and "seed None" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>bad</b>" not in page and "steps: &lt;0&gt;" in page
    assert 'src="a%20b%231.mp4"' in page and 'poster="a%20b%231.poster.png"' in page
    links = re.findall(r'(?:src|href|poster)="([^"]*)"', page)
    assert links and all(not re.match(r"^[a-z]+:|^/", link) for link in links)  # relative only, no scheme, no server
    assert "1 rendered, 2 failed, 0 pending" in page


def find_chromium():
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("SORAGEN_REQUIRE_BROWSER"):
            pytest.fail("SORAGEN_REQUIRE_BROWSER is set but chromium is not installed")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    return path


def dump_dom(chromium, page, profile):
    """Open a page from disk in headless Chromium; return the DOM after its scripts ran."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_gallery_plays_every_video_in_chromium(tmp_path, chromium, fmt):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "\n".join([
            '{"prompt": "a red ball"}',
            json.dumps({"prompt": HOSTILE, "seconds": 0.5}),
            '{"prompt": "a blue star", "name": "star clip #1", "seconds": 1.5}',
            '{"prompt": "broken", "steps": 0}',
        ]) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "gallery folder"  # a space in the path: links must still resolve
    result = run_batch(batch_config(format=fmt), prompts, out)
    assert len(result.rendered) == 3 and len(result.failed) == 1
    records = {r["prompt"]: r for r in read_records(out / MANIFEST)}
    for rec in records.values():
        if rec["status"] == "ok":
            assert imageio.imread(out / rec["files"]["poster"]["path"]).shape == (64, 64, 3)
            assert imageio.imread(out / rec["files"]["contact_sheet"]["path"]).shape[1] > 64

    dom = dump_dom(chromium, out / "index.html", tmp_path / "profile")
    tags = re.findall(r"<video\b[^>]*>", dom)
    assert len(tags) == 3, dom[:3000]
    durations = {}
    for tag in tags:
        src = re.search(r'src="([^"]*)"', tag).group(1)
        found = re.search(r'data-duration="([0-9.]+)"', tag)
        assert found, f"no duration reported for {src}: {tag}"
        durations[src] = float(found.group(1))
    expected = sorted(r["video"]["seconds"] for r in records.values() if r["status"] == "ok")
    assert sorted(durations.values()) == pytest.approx(expected, abs=0.15)
    assert any("%E4%B8%80" in src for src in durations)  # 一 in a file name: a percent-encoded relative link that resolves
    assert "<script>alert" not in dom  # the prompt shows as text, never as markup
    assert "failed: steps: must be between 1 and 1000" in dom
