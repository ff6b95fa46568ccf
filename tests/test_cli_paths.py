"""Store paths no command can use are refused before the command starts, in one line naming the path and the
problem (exit code 2), never with a traceback: a regular file, a directory under a file, a read-only filesystem."""

import os
import shutil
import subprocess
import sys

import pytest

from kvblend.cli import EXIT_BAD_INPUT, main


@pytest.fixture
def quiet_vllm(monkeypatch):
    for name, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("VLLM_LOGGING_STREAM", "ext://sys.stderr")):
        monkeypatch.setenv(name, value)  # main sets them where unset


def test_a_file_is_no_store_directory(tmp_path, capsys, quiet_vllm):
    blob = tmp_path / "blob"
    blob.write_text("not a store")
    for argv in (["stats", "--store", blob], ["precompute", "--pydoc-topics", "--store", blob],
                 ["stats", "--store", blob / "store"], ["serve", "--print-command", "--store", blob]):
        assert main([str(a) for a in argv]) == EXIT_BAD_INPUT, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot use {argv[-1]} as the store directory: {blob} is a file" in err, err
    assert blob.read_text() == "not a store"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to mount a read-only filesystem")
def test_a_new_store_on_a_read_only_filesystem_is_refused(tmp_path):
    """`kvblend stats` in a private mount namespace where tmp_path/ro is a read-only tmpfs."""
    (tmp_path / "ro").mkdir()
    store = tmp_path / "ro" / "store"
    script = f"mount -t tmpfs -o ro,size=64k tmpfs {tmp_path / 'ro'} && exec {sys.executable} -m kvblend.cli stats --store {store}"
    run = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, VLLM_LOGGING_LEVEL="ERROR"))
    if run.returncode != EXIT_BAD_INPUT and "mount" in run.stderr:
        pytest.skip(f"cannot mount a read-only filesystem here: {run.stderr.strip()}")
    assert run.returncode == EXIT_BAD_INPUT and run.stderr.count("\n") == 1, run.stderr
    assert f"cannot use {store} as the store directory: {tmp_path / 'ro'} is on a read-only file system" in run.stderr
