"""Writers under interruption: temporary files are recorded before a signal can land."""

import os
import signal
import threading
import time

import pytest

from soragen import video_io


@pytest.mark.parametrize("threads", [0, 2], ids=["one-thread", "other-threads-running"])
def test_signals_held_delivers_after_the_block(threads):
    """A signal sent while a temporary file is being created and recorded is acted on only after the block,
    also when other threads (which the kernel may hand the signal to) are running."""
    stop = threading.Event()
    workers = [threading.Thread(target=stop.wait) for _ in range(threads)]
    for w in workers:
        w.start()
    reached_end = False
    # Python's own Ctrl-C handler (earlier in-process CLI tests install soragen's; a shell may start us with SIGINT ignored).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with video_io.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                reached_end = True
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler in place before is back
    finally:
        signal.signal(signal.SIGINT, before)
        stop.set()
        for w in workers:
            w.join()
    assert reached_end


def test_writer_interrupted_while_opening_leaves_nothing(tmp_path, monkeypatch):
    """An interruption while ffmpeg starts removes the temporary file the writer had made."""
    def interrupted(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(video_io._FfmpegWriter, "_start", interrupted)
    with pytest.raises(KeyboardInterrupt):
        video_io.open_writer(tmp_path / "a.mp4", "mp4", 16, 16, 8)
    assert list(tmp_path.iterdir()) == []
