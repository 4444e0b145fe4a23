"""The download path, against a local HTTP server on loopback that serves the mirror."""

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdpo.data.sources.fetch import DATASETS, fetch, sha256_of, verified_path
from sdpo.errors import UserError


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(tmp_path, mirror):
    """serve(corrupt=None) -> base URL of a loopback server laid out like the pinned repositories."""
    servers = []

    def start(corrupt: str | None = None) -> str:
        root = tmp_path / f"www{len(servers)}"
        for remote in DATASETS["lastfm"]:
            dest = root / remote.repo / remote.commit / remote.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mirror / "lastfm" / remote.name, dest)
            if remote.name == corrupt:
                dest.write_bytes(dest.read_bytes() + b"tampered")
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_checks_every_file(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_MIRROR", raising=False)
    monkeypatch.setenv("SDPO_DOWNLOAD_BASE", serve())
    folder = fetch("lastfm", tmp_path / "raw")
    for remote in DATASETS["lastfm"]:
        assert sha256_of(folder / remote.name) == remote.sha256
    assert sorted(p.name for p in folder.iterdir()) == sorted(r.name for r in DATASETS["lastfm"])


def test_download_refuses_a_tampered_file(serve, tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_MIRROR", raising=False)
    monkeypatch.setenv("SDPO_DOWNLOAD_BASE", serve(corrupt="Test_data.df"))
    with pytest.raises(UserError, match="SHA-256 mismatch for Test_data.df"):
        fetch("lastfm", tmp_path / "raw")
    assert not (tmp_path / "raw" / "lastfm" / "Test_data.df").exists()
    assert not [p for p in (tmp_path / "raw" / "lastfm").iterdir() if p.name.startswith(".")]


def test_unreachable_host_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_MIRROR", raising=False)
    monkeypatch.setenv("SDPO_DOWNLOAD_BASE", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="download of http://127.0.0.1:9/.* failed"):
        fetch("lastfm", tmp_path / "raw")


def test_mirror_copy_and_tampered_mirror(mirror, tmp_path):
    folder = fetch("lastfm", tmp_path / "raw", mirror=mirror)
    assert verified_path(folder, "lastfm", "id2name.txt").is_file()
    bad = tmp_path / "badmirror" / "lastfm"
    shutil.copytree(mirror / "lastfm", bad)
    (bad / "Val_data.df").chmod(0o644)
    (bad / "Val_data.df").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="SHA-256 mismatch for Val_data.df"):
        fetch("lastfm", tmp_path / "raw2", mirror=tmp_path / "badmirror")
    with pytest.raises(UserError, match="is missing"):
        fetch("lastfm", tmp_path / "raw3", mirror=tmp_path / "nowhere")


def test_a_swapped_raw_file_is_not_unpickled(mirror, tmp_path):
    folder = fetch("lastfm", tmp_path / "raw", mirror=mirror)
    (folder / "train_data.df").write_bytes(b"evil")
    with pytest.raises(UserError, match="SHA-256 does not match"):
        verified_path(folder, "lastfm", "train_data.df")


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        fetch("nope", tmp_path)
