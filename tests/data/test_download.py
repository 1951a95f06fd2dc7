"""Downloads against a local HTTP server that imitates the Dataverse native API (no internet)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import threading
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from skinlesion.data.download import (
    HAM10000_DOI,
    DownloadError,
    RemoteFile,
    download_dataset,
    download_file,
    list_dataset_files,
)

LISTING_PATH = "/api/datasets/:persistentId/"
PART1, PART2, NOTES = 11, 12, 14
META = 13
CSV = b"lesion_id,image_id,dx\nHAM_0000001,ISIC_0000001,nv\nHAM_0000002,ISIC_0000003,mel\n"
TAB = CSV.replace(b",", b"\t")  # what Dataverse serves without ?format=original


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    range: str | None


@dataclass
class FakeDataverse:
    """Server state; tests change the knobs before calling the code under test."""

    url: str = ""
    files: dict[int, bytes] = field(default_factory=dict)
    originals: dict[int, bytes] = field(default_factory=dict)
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    listing_status: int = 200
    listing_body: bytes | None = None
    cut_after: int = 0  # bytes sent before dropping the connection, while cuts_left > 0
    cuts_left: int = 0
    fails_left: int = 0  # answer 503 this many times first
    ignore_range: bool = False

    def file_requests(self) -> list[Seen]:
        return [r for r in self.requests if r.path.startswith("/api/access/datafile/")]

    def set_file(self, file_id: int, data: bytes) -> None:
        """Serve new bytes for a plain file, with the listing's size and checksum to match."""
        self.files[file_id] = data
        entry = self.entries[file_id]
        entry["filesize"] = len(data)
        if "checksum" in entry:
            entry["checksum"]["value"] = _digest(entry["checksum"]["type"], data)
        if "md5" in entry:
            entry["md5"] = hashlib.md5(data).hexdigest()


def _digest(checksum_type: str, data: bytes) -> str:
    return hashlib.new(checksum_type.replace("-", "").lower(), data).hexdigest()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    state: FakeDataverse  # set on a per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query)
        self.state.requests.append(Seen(split.path, query, self.headers.get("Range")))
        match = re.fullmatch(r"/api/access/datafile/(\d+)", split.path)
        if split.path == LISTING_PATH and query.get("persistentId") == [HAM10000_DOI]:
            self._listing()
        elif match and int(match.group(1)) in self.state.files:
            self._datafile(int(match.group(1)), query)
        else:
            self._send(404, b'{"status":"ERROR","message":"not found"}')

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _listing(self) -> None:
        state = self.state
        if state.listing_status != 200:
            self._send(state.listing_status, b'{"status":"ERROR","message":"boom"}')
            return
        files = [{"label": e["filename"], "dataFile": e} for e in state.entries.values()]
        body = json.dumps({"status": "OK", "data": {"latestVersion": {"files": files}}}).encode()
        self._send(200, state.listing_body if state.listing_body is not None else body)

    def _datafile(self, file_id: int, query: dict[str, list[str]]) -> None:
        state = self.state
        if state.fails_left > 0:
            state.fails_left -= 1
            self._send(503, b"busy")
            return
        original = query.get("format") == ["original"] and file_id in state.originals
        data = state.originals[file_id] if original else state.files[file_id]
        status, headers, body = 200, {}, data
        requested = self.headers.get("Range")
        if requested and not state.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1))
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status, body = 206, data[start:]
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if state.cuts_left > 0:
            # Promise the whole body, send part of it, then hang up.
            state.cuts_left -= 1
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: state.cut_after])
            self.close_connection = True
            return
        self._send(status, body, headers)


def _fake_dataset() -> FakeDataverse:
    state = FakeDataverse()
    part1 = _zip({"ISIC_0000001.jpg": b"jpeg-1" * 40, "ISIC_0000002.jpg": b"jpeg-2" * 40})
    part2 = _zip(
        {
            "HAM10000_images_part_2/ISIC_0000003.jpg": b"jpeg-3" * 40,
            "HAM10000_images_part_2/ISIC_0000004.jpg": b"jpeg-4" * 40,
        }
    )
    notes = b"not part of HAM10000_FILES\n"
    state.files = {PART1: part1, PART2: part2, META: TAB, NOTES: notes}
    state.originals = {META: CSV}
    state.entries = {
        PART1: {
            "id": PART1,
            "filename": "HAM10000_images_part_1.zip",
            "filesize": len(part1),
            "checksum": {"type": "MD5", "value": _digest("MD5", part1)},
        },
        # An older server: md5 only.
        PART2: {
            "id": PART2,
            "filename": "HAM10000_images_part_2.zip",
            "filesize": len(part2),
            "md5": _digest("MD5", part2),
        },
        # Ingested tabular: filesize is the .tab's, the checksum is the original CSV's.
        META: {
            "id": META,
            "filename": "HAM10000_metadata.tab",
            "filesize": len(TAB),
            "checksum": {"type": "SHA-256", "value": _digest("SHA-256", CSV)},
            "originalFileFormat": "text/csv",
            "originalFileName": "HAM10000_metadata.csv",
            "originalFileSize": len(CSV),
        },
        NOTES: {
            "id": NOTES,
            "filename": "notes.txt",
            "filesize": len(notes),
            "checksum": {"type": "SHA-1", "value": _digest("SHA-1", notes)},
        },
    }
    return state


@pytest.fixture
def dataverse() -> Iterator[FakeDataverse]:
    state = _fake_dataset()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy from the environment would intercept requests meant for the local server.
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _remote(dv: FakeDataverse, filename: str) -> RemoteFile:
    return next(f for f in list_dataset_files(server=dv.url) if f.filename == filename)


def _get(dv: FakeDataverse, remote: RemoteFile, dest: Path, **kwargs: Any) -> Path:
    return download_file(remote, dest, backoff=0, progress=False, **kwargs)


def test_list_dataset_files_reads_checksums_and_originals(dataverse: FakeDataverse) -> None:
    files = {f.file_id: f for f in list_dataset_files(server=dataverse.url + "/")}
    assert set(files) == {PART1, PART2, META, NOTES}
    part1 = files[PART1]
    assert part1.filename == "HAM10000_images_part_1.zip"
    assert part1.size == len(dataverse.files[PART1])
    assert (part1.checksum_type, part1.checksum) == ("MD5", _digest("MD5", dataverse.files[PART1]))
    assert part1.url == f"{dataverse.url}/api/access/datafile/{PART1}"
    assert files[PART2].checksum_type == "MD5"  # from the legacy md5 key
    assert files[PART2].checksum == _digest("MD5", dataverse.files[PART2])
    meta = files[META]
    assert meta.filename == "HAM10000_metadata.csv"
    assert meta.size == len(CSV)
    assert (meta.checksum_type, meta.checksum) == ("SHA-256", _digest("SHA-256", CSV))
    assert meta.url == f"{dataverse.url}/api/access/datafile/{META}?format=original"
    assert files[NOTES].checksum_type == "SHA-1"


@pytest.mark.parametrize("status", [404, 500])
def test_listing_http_error_names_url(dataverse: FakeDataverse, status: int) -> None:
    dataverse.listing_status = status
    with pytest.raises(
        DownloadError, match=rf"{re.escape(dataverse.url + LISTING_PATH)}.*{status}"
    ):
        list_dataset_files(server=dataverse.url)


@pytest.mark.parametrize(
    ("body", "message"),
    [(b"{not json", "malformed JSON"), (b'{"status": "OK", "data": {}}', "latestVersion")],
)
def test_listing_bad_json_names_url(dataverse: FakeDataverse, body: bytes, message: str) -> None:
    dataverse.listing_body = body
    with pytest.raises(DownloadError, match=message) as info:
        list_dataset_files(server=dataverse.url)
    assert LISTING_PATH in str(info.value)


def test_listing_unreachable_server() -> None:
    with pytest.raises(DownloadError, match="127.0.0.1:9"):
        list_dataset_files(server="http://127.0.0.1:9", timeout=2)


def test_download_file_saves_verified_bytes(dataverse: FakeDataverse, tmp_path: Path) -> None:
    path = _get(dataverse, _remote(dataverse, "notes.txt"), tmp_path)
    assert path == tmp_path / "notes.txt"
    assert path.read_bytes() == dataverse.files[NOTES]
    assert not (tmp_path / "notes.txt.part").exists()


def test_wrong_checksum_raises_and_leaves_nothing(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.entries[PART1]["checksum"]["value"] = "0" * 32
    with pytest.raises(DownloadError, match=r"checksum mismatch.*expected 0{32}, got [0-9a-f]{32}"):
        _get(dataverse, _remote(dataverse, "HAM10000_images_part_1.zip"), tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a .part to resume from


def test_dropped_connection_resumes_with_range(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.cut_after, dataverse.cuts_left = 50, 1
    path = _get(dataverse, _remote(dataverse, "HAM10000_images_part_1.zip"), tmp_path)
    assert path.read_bytes() == dataverse.files[PART1]
    assert [r.range for r in dataverse.file_requests()] == [None, "bytes=50-"]


def test_dropped_connection_detected_without_known_size(
    dataverse: FakeDataverse, tmp_path: Path
) -> None:
    # With no size in the listing, only Content-Length reveals the short body.
    remote = dataclasses.replace(_remote(dataverse, "HAM10000_images_part_1.zip"), size=None)
    dataverse.cut_after, dataverse.cuts_left = 50, 1
    path = _get(dataverse, remote, tmp_path)
    assert path.read_bytes() == dataverse.files[PART1]
    assert [r.range for r in dataverse.file_requests()] == [None, "bytes=50-"]


def test_persistent_truncation_raises_after_retries(
    dataverse: FakeDataverse, tmp_path: Path
) -> None:
    dataverse.cut_after, dataverse.cuts_left = 10, 1000
    remote = _remote(dataverse, "HAM10000_images_part_1.zip")
    with pytest.raises(DownloadError, match=rf"truncated \(expected {remote.size} bytes, got 30\)"):
        _get(dataverse, remote, tmp_path, retries=2)
    # Each retry resumed where the last one stopped; the part is kept for a later run.
    assert [r.range for r in dataverse.file_requests()] == [None, "bytes=10-", "bytes=20-"]
    assert (tmp_path / "HAM10000_images_part_1.zip.part").read_bytes() == dataverse.files[PART1][
        :30
    ]
    assert not (tmp_path / "HAM10000_images_part_1.zip").exists()


def test_existing_part_is_resumed(dataverse: FakeDataverse, tmp_path: Path) -> None:
    data = dataverse.files[PART2]
    (tmp_path / "HAM10000_images_part_2.zip.part").write_bytes(data[:100])
    path = _get(dataverse, _remote(dataverse, "HAM10000_images_part_2.zip"), tmp_path)
    assert path.read_bytes() == data
    assert [r.range for r in dataverse.file_requests()] == ["bytes=100-"]


def test_server_ignoring_range_restarts_from_zero(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.ignore_range = True
    (tmp_path / "notes.txt.part").write_bytes(b"stale")
    path = _get(dataverse, _remote(dataverse, "notes.txt"), tmp_path)
    assert path.read_bytes() == dataverse.files[NOTES]  # not b"stale" + the whole file


def test_416_with_complete_part_finishes(dataverse: FakeDataverse, tmp_path: Path) -> None:
    # Unknown size, so the part has to be confirmed complete by the server's 416.
    remote = dataclasses.replace(_remote(dataverse, "notes.txt"), size=None)
    (tmp_path / "notes.txt.part").write_bytes(dataverse.files[NOTES])
    path = _get(dataverse, remote, tmp_path)
    assert path.read_bytes() == dataverse.files[NOTES]
    assert [r.range for r in dataverse.file_requests()] == [f"bytes={len(dataverse.files[NOTES])}-"]


def test_416_with_oversized_part_restarts(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = dataclasses.replace(_remote(dataverse, "notes.txt"), size=None)
    (tmp_path / "notes.txt.part").write_bytes(dataverse.files[NOTES] + b"junk")
    path = _get(dataverse, remote, tmp_path, retries=0)
    assert path.read_bytes() == dataverse.files[NOTES]
    assert [r.range for r in dataverse.file_requests()][-1] is None


def test_server_errors_are_retried(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.fails_left = 2
    path = _get(dataverse, _remote(dataverse, "notes.txt"), tmp_path, retries=2)
    assert path.read_bytes() == dataverse.files[NOTES]
    dataverse.fails_left = 2
    with pytest.raises(DownloadError, match="failed after 2 attempts: HTTP 503"):
        _get(dataverse, _remote(dataverse, "notes.txt"), tmp_path / "again", retries=1)


def test_client_error_is_not_retried(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = dataclasses.replace(
        _remote(dataverse, "notes.txt"), url=f"{dataverse.url}/api/access/datafile/999"
    )
    with pytest.raises(DownloadError, match=r"datafile/999.*HTTP 404"):
        _get(dataverse, remote, tmp_path)
    assert len(dataverse.file_requests()) == 1


def test_existing_mismatching_file_is_replaced(dataverse: FakeDataverse, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_bytes(b"x" * len(dataverse.files[NOTES]))
    path = _get(dataverse, _remote(dataverse, "notes.txt"), tmp_path)
    assert path.read_bytes() == dataverse.files[NOTES]


def test_unsafe_filename_is_refused(dataverse: FakeDataverse, tmp_path: Path) -> None:
    remote = dataclasses.replace(_remote(dataverse, "notes.txt"), filename="../notes.txt")
    with pytest.raises(DownloadError, match="plain file name"):
        _get(dataverse, remote, tmp_path / "data")
    assert not (tmp_path / "notes.txt").exists()


def test_download_dataset_happy_path_and_rerun(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dest = tmp_path / "ham"
    assert download_dataset(dest, server=dataverse.url, backoff=0, progress=False) == dest
    assert (dest / "HAM10000_images_part_1" / "ISIC_0000001.jpg").read_bytes() == b"jpeg-1" * 40
    assert (dest / "HAM10000_images_part_2" / "ISIC_0000004.jpg").read_bytes() == b"jpeg-4" * 40
    assert not (dest / "HAM10000_images_part_2" / "HAM10000_images_part_2").exists()
    assert (dest / "HAM10000_metadata.csv").read_bytes() == CSV
    assert not (dest / "notes.txt").exists()  # not wanted by default
    assert not list(dest.glob("*.part"))
    assert (dest / ".HAM10000_images_part_1.zip.extracted").exists()
    meta_requests = [r for r in dataverse.file_requests() if r.path.endswith(f"/{META}")]
    assert [r.query.get("format") for r in meta_requests] == [["original"]]

    dataverse.requests.clear()
    marker_file = dest / "HAM10000_images_part_1" / "ISIC_0000001.jpg"
    marker_file.write_bytes(b"edited")
    download_dataset(dest, server=dataverse.url, backoff=0, progress=False)
    assert dataverse.file_requests() == []
    assert marker_file.read_bytes() == b"edited"  # not unzipped again


def test_download_dataset_without_extract_and_all_files(
    dataverse: FakeDataverse, tmp_path: Path
) -> None:
    download_dataset(tmp_path, server=dataverse.url, wanted=None, extract=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "HAM10000_images_part_1.zip",
        "HAM10000_images_part_2.zip",
        "HAM10000_metadata.csv",
        "notes.txt",
    ]


def test_unknown_wanted_name_lists_available(dataverse: FakeDataverse, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="nope.zip") as info:
        download_dataset(
            tmp_path, server=dataverse.url, wanted=["HAM10000_images_part_1.zip", "nope.zip"]
        )
    message = str(info.value)
    for name in ("HAM10000_images_part_1.zip", "HAM10000_metadata.csv", "notes.txt"):
        assert name in message
    assert dataverse.file_requests() == []  # checked before anything is downloaded


def test_corrupt_zip_names_the_file(dataverse: FakeDataverse, tmp_path: Path) -> None:
    dataverse.set_file(PART1, b"this is not a zip archive")
    with pytest.raises(DownloadError, match="HAM10000_images_part_1.zip"):
        download_dataset(tmp_path, server=dataverse.url, progress=False)
    assert not (tmp_path / ".HAM10000_images_part_1.zip.extracted").exists()


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "a/../../evil.txt"])
def test_zip_path_traversal_is_refused(
    dataverse: FakeDataverse, tmp_path: Path, member: str
) -> None:
    dataverse.set_file(PART1, _zip({"ok.jpg": b"ok", member: b"evil"}))
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="refusing to extract"):
        download_dataset(
            dest, server=dataverse.url, wanted=["HAM10000_images_part_1.zip"], progress=False
        )
    assert not list(tmp_path.rglob("evil.txt"))
    assert not (dest / "HAM10000_images_part_1").exists()  # nothing extracted at all
