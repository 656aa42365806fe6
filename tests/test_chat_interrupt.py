"""Ctrl-C during a reply stops the reply, not the session (interactive chat on a pseudo-terminal)."""

import os
import pty
import select
import signal
import subprocess
import sys
import time

from conftest import ROOT


def _read_until(fd, needle, timeout):
    seen = b""
    end = time.monotonic() + timeout
    while needle not in seen:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {seen[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(builds, bundled_model):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "iceformer_llama", "chat", "-n", "400", "--temp", "0",
                             "--ctx-size", "1024", "--threads", "1"],
                            stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True)
    os.close(follower)
    try:
        _read_until(leader, b"> ", 120)
        os.write(leader, b"Write a very long story about a lighthouse keeper.\r\n")
        _read_until(leader, b"lighthouse", 120)   # the echo; then wait for the reply to stream
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        after = _read_until(leader, b"[stopped]", 60)
        assert b"Traceback" not in after
        _read_until(leader, b"> ", 60)             # the session is still there
        os.write(leader, b"/exit\r\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
