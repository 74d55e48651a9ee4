"""Writers under interruption: temporary files are recorded before a signal can land."""

import os
import signal
import time

import pytest

from soragen import video_io


def test_signals_held_delivers_after_the_block():
    """A signal sent while a temporary file is being created and recorded arrives only after the block."""
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with video_io.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached_end = True
    assert reached_end


def test_writer_interrupted_while_opening_leaves_nothing(tmp_path, monkeypatch):
    """An interruption while ffmpeg starts removes the temporary file the writer had made."""
    def interrupted(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io._FfmpegWriter, "_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        video_io.open_writer(tmp_path / "a.mp4", "mp4", 16, 16, 8)
    assert list(tmp_path.iterdir()) == []
