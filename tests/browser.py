"""Headless Chromium for the browser tests: found, or installed with apt when we are root.

``find_or_install_chromium()`` returns the path of Debian's ``chromium`` or None
(with the reason) when it is missing and cannot be installed. ``Chromium`` runs
one headless browser on a URL in a process group of its own and kills exactly
that group when stopped.
"""

import os
import shutil
import signal
import subprocess
import tempfile

INSTALL_TIMEOUT_S = 900
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def _which() -> str:
    return shutil.which("chromium") or ("/usr/bin/chromium"
                                        if os.access("/usr/bin/chromium", os.X_OK) else None)


def find_or_install_chromium():
    """``(path, None)`` or ``(None, why not)``."""
    path = _which()
    if path:
        return path, None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "chromium is not installed and we cannot apt-get install it (not root)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    for attempt in (install, ["apt-get", "update"], install):
        subprocess.run(attempt, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S, check=False)
        path = _which()
        if path:
            return path, None
    return None, "apt-get install chromium failed"


class Chromium:
    """One headless Chromium showing ``url``, with a profile directory of its own."""

    def __init__(self, binary: str, url: str, extra_flags=()):
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-profile-",
                                                   ignore_cleanup_errors=True)
        self.log = tempfile.TemporaryFile()
        self.popen = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={self.profile.name}",
                                       *extra_flags, url], stdin=subprocess.DEVNULL, stdout=self.log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-4000:]

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)  # the group this object started
            except ProcessLookupError:
                pass
        self.popen.wait(10)
        self.log.close()
        self.profile.cleanup()
