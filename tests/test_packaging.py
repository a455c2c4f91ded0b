"""The wheel: built from this checkout, installed into a fresh virtualenv outside it, runs a cluster."""

import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

from .cluster import Process
from .http import request
from .ports import free_port_block

ROOT = Path(__file__).resolve().parent.parent
# What the wheel needs at run time, borrowed from this virtualenv so that the test
# needs no network; firehose_zmq itself must come from the wheel.
DEPENDENCIES = ("zmq", "pyzmq.libs", "tornado", "msgpack", "uvloop", "prometheus_client", "jwt",
                "cryptography", "cffi", "_cffi_backend*")


def site_packages(python: Path) -> Path:
    out = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, timeout=30)
    return Path(out.stdout.strip())


def test_wheel_installs_and_runs_a_cluster_outside_the_checkout(tmp_path):
    # Built from a copy of what the Dockerfile copies, so the checkout gets no build/.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "firehose_zmq", source / "firehose_zmq",
                    ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(wheels), str(source)],
                   check=True, timeout=300, cwd=tmp_path)
    wheel = next(wheels.glob("firehose_zmq-*.whl"))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    borrowed = tmp_path / "deps"
    borrowed.mkdir()
    ours = site_packages(Path(sys.executable))
    for pattern in DEPENDENCIES:
        for path in ours.glob(pattern):
            (borrowed / path.name).symlink_to(path)
    (site_packages(python) / "deps.pth").write_text(str(borrowed) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300,
                   cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PORT", "PYTHONPATH") and not k.startswith("FIREHOSE_")}
    where = subprocess.run([str(python), "-c", "import firehose_zmq; print(firehose_zmq.__file__)"],
                           capture_output=True, text=True, check=True, cwd=work, env=env,
                           timeout=30).stdout.strip()
    assert where.startswith(str(env_dir)), where

    base = free_port_block()
    env.update(FIREHOSE_PORT_BASE=str(base), FIREHOSE_STORAGE_DATA_DIR=str(work / "var"))
    cluster = Process("installed cluster", [str(env_dir / "bin" / "firehose-cluster")], env)
    try:
        for line in ("edge listening", "worker w1 up", "worker w2 up"):
            cluster.wait_for(line)
        assert request(f"http://127.0.0.1:{base}/packaged", "PUT", b"hi").status == 202
        assert request(f"http://127.0.0.1:{base}/packaged").body == \
            b'{"message":"hi","last_sequence":1}'
        page = request(f"http://127.0.0.1:{base + 3}/")
        assert page.status == 200 and b"firehose-zmq status" in page.body
        assert request(f"http://127.0.0.1:{base + 3}/readyz").status == 200
        version = subprocess.run([str(env_dir / "bin" / "firehose-ctl"), "--version"],
                                 capture_output=True, text=True, timeout=30, cwd=work)
        assert version.returncode == 0 and version.stdout.startswith("firehose-ctl ")
    finally:
        cluster.signal(signal.SIGTERM)
        assert cluster.popen.wait(30) == 0
        cluster.stop()
