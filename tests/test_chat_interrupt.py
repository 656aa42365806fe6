"""Ctrl-C during a reply stops the reply, not the session (interactive chat on a pseudo-terminal)."""

import os
import pty
import select
import signal
import subprocess
import sys
import time

from conftest import ROOT


class _Terminal:
    """Reads a pty; until() consumes output up to and including a needle, keeping what follows."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def until(self, needle, timeout):
        end = time.monotonic() + timeout
        while needle not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got {self.buf[-400:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                self.buf += chunk
        if needle not in self.buf:
            raise AssertionError(f"the chat ended before {needle!r}; got {self.buf[-400:]!r}")
        i = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:i], self.buf[i:]
        return seen


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(builds, bundled_model):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "iceformer_llama", "chat", "-n", "400", "--temp", "0",
                             "--ctx-size", "1024", "--threads", "1"],
                            stdin=follower, stdout=follower, stderr=follower, cwd=ROOT, close_fds=True)
    os.close(follower)
    term = _Terminal(leader)
    try:
        term.until(b"> ", 120)
        os.write(leader, b"Write a very long story about a lighthouse keeper.\r\n")
        term.until(b"lighthouse", 120)   # the echo; then let the reply stream a while
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        after = term.until(b"[stopped]", 60)
        assert b"Traceback" not in after
        term.until(b"> ", 60)             # the session is still there
        os.write(leader, b"/exit\r\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
