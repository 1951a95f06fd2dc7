"""Fetch HAM10000 from Harvard Dataverse: resumable, checksum-verified, standard library only.

Example::

    from pathlib import Path
    from skinlesion.data.download import download_dataset

    download_dataset(Path("data/ham10000"))  # zips unzipped, metadata saved as CSV
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from skinlesion.core.errors import DownloadError

log = logging.getLogger(__name__)

DATAVERSE_SERVER = "https://dataverse.harvard.edu"
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
# The metadata is matched by stem: Dataverse serves it ingested as HAM10000_metadata.tab, and its
# original upload is a CSV.
HAM10000_FILES = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip", "HAM10000_metadata")

CHUNK_SIZE = 1 << 20
# HAM10000's two image zips unpack to about 3 GB; ten times that is not a dataset but a zip bomb.
MAX_EXTRACT_BYTES = 32 << 30
USER_AGENT = "skinlesion-download/0.1 (python-urllib)"
# Dataverse's checksum type names -> hashlib names.
_HASH_NAMES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}
# Statuses worth retrying besides 5xx: the server asks us to come back later.
_RETRY_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class RemoteFile:
    """One file of a Dataverse dataset, described as it will be saved locally."""

    file_id: int
    filename: str
    size: int | None
    checksum_type: str
    checksum: str
    url: str


def list_dataset_files(
    doi: str = HAM10000_DOI, server: str = DATAVERSE_SERVER, timeout: float = 60.0
) -> list[RemoteFile]:
    """List the files of the latest version of a Dataverse dataset.

    Ingested tabular files are described by their original upload (name, size, checksum).
    """
    server = server.rstrip("/")
    url = f"{server}/api/datasets/:persistentId/?persistentId={urllib.parse.quote(doi, safe=':/')}"
    payload = _get_json(url, timeout)
    if isinstance(payload, dict) and payload.get("status", "OK") != "OK":
        raise DownloadError(
            f"GET {url}: expected status OK, got {payload.get('status')!r}: "
            f"{payload.get('message', '')}"
        )
    try:
        entries = payload["data"]["latestVersion"]["files"]
        return [_parse_data_file(entry["dataFile"], server) for entry in entries]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DownloadError(
            f"GET {url}: unexpected JSON, expected data.latestVersion.files[*].dataFile with "
            f"id and filename ({type(exc).__name__}: {exc})"
        ) from exc


def download_file(
    remote: RemoteFile,
    dest_dir: Path,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Download one file into dest_dir and return its path, once size and checksum check out.

    The body goes to ``<filename>.part`` and is resumed with a Range request after a dropped
    connection or an earlier interrupted run; a file already saved and verified is not fetched.
    """
    if (
        not remote.filename
        or remote.filename in (".", "..")
        or Path(remote.filename).name != remote.filename
    ):
        # The name comes from the server; it must not point outside dest_dir.
        raise DownloadError(
            f"refusing to save {remote.url} as {remote.filename!r}: expected a plain file name"
        )
    hash_name = _hash_name(remote)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.filename
    part = dest_dir / f"{remote.filename}.part"
    if final.exists():
        if hash_name is None and remote.size is None:
            log.warning(
                "%s already downloaded; UNVERIFIED: the server reports neither checksum nor size",
                final,
            )
            return final
        if _matches(final, remote, hash_name):
            log.info("%s already downloaded and verified, skipping", final)
            return final
        log.warning("%s exists but does not match the server's copy; downloading again", final)
    _fetch_with_retries(remote, part, retries, timeout, backoff, progress)
    _verify(part, remote, hash_name)
    os.replace(part, final)
    log.info("saved %s", final)
    return final


def download_dataset(
    dest: Path,
    doi: str = HAM10000_DOI,
    server: str = DATAVERSE_SERVER,
    wanted: Sequence[str] | None = HAM10000_FILES,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    extract: bool = True,
    progress: bool = True,
) -> Path:
    """Download the wanted files of a dataset into dest, unzip the zips, and return dest.

    ``wanted`` holds file names or stems (None: every file). Safe to rerun: verified files are
    not fetched again and extracted zips are not unzipped again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    available = list_dataset_files(doi, server, timeout)
    chosen = _select(available, wanted, f"{doi} on {server}")
    for remote in chosen:
        path = download_file(remote, dest, retries, timeout, backoff, progress)
        if extract and path.suffix.lower() == ".zip":
            _extract_zip(path, dest)
    return dest


def _get_json(url: str, timeout: float) -> Any:
    request = urllib.request.Request(
        url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read(500).decode("utf-8", "replace").strip()
        exc.close()
        raise DownloadError(
            f"GET {url}: expected HTTP 200 with the dataset JSON, got HTTP {exc.code} "
            f"{exc.reason}: {detail}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise DownloadError(f"GET {url}: expected JSON, got malformed JSON ({exc})") from exc


def _parse_data_file(data: dict[str, Any], server: str) -> RemoteFile:
    file_id = int(data["id"])
    filename = str(data["filename"])
    size = _optional_int(data.get("filesize"))
    checksum = data.get("checksum")
    if isinstance(checksum, dict):
        checksum_type, checksum_value = str(checksum["type"]), str(checksum["value"])
    elif data.get("md5"):  # servers older than Dataverse 4.6 report only md5
        checksum_type, checksum_value = "MD5", str(data["md5"])
    else:
        checksum_type, checksum_value = "", ""
    url = f"{server}/api/access/datafile/{file_id}"
    if data.get("originalFileName"):
        # An ingested tabular file: the default download is Dataverse's .tab rendering, while
        # the checksum is of the original upload, so ask for (and save) the original.
        filename = str(data["originalFileName"])
        size = _optional_int(data.get("originalFileSize"))
        url += "?format=original"
    elif data.get("originalFileFormat"):
        # Ingested, but the server does not say the original name: keep the .tab, whose
        # checksum Dataverse does not report, so only its size can be checked.
        log.warning("%s: no original file name reported; saving the ingested .tab", filename)
        checksum_type, checksum_value = "", ""
    return RemoteFile(file_id, filename, size, checksum_type, checksum_value, url)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _hash_name(remote: RemoteFile) -> str | None:
    if not remote.checksum:
        return None
    name = _HASH_NAMES.get(remote.checksum_type.upper())
    if name is None:
        raise DownloadError(
            f"{remote.filename} ({remote.url}): expected a checksum type among "
            f"{sorted(_HASH_NAMES)}, got {remote.checksum_type!r}"
        )
    return name


def _digest(path: Path, hash_name: str) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, hash_name).hexdigest()


def _matches(path: Path, remote: RemoteFile, hash_name: str | None) -> bool:
    # Size first: it is free, and hashing a multi-GB zip is not.
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    return hash_name is None or _digest(path, hash_name) == remote.checksum.lower()


def _verify(part: Path, remote: RemoteFile, hash_name: str | None) -> None:
    if hash_name is None:
        if remote.size is None:
            # Kept, as the data may be fine, but never called verified.
            log.warning(
                "%s: UNVERIFIED, the server reports neither checksum nor size for %s",
                part,
                remote.filename,
            )
        else:
            log.warning("%s: the server reports no checksum; only the size was checked", part)
        return
    got = _digest(part, hash_name)
    if got != remote.checksum.lower():
        # A corrupt part must not be resumed from on the next run.
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{remote.filename} ({remote.url}): {remote.checksum_type} checksum mismatch, "
            f"expected {remote.checksum}, got {got}; deleted the download"
        )


def _fetch_with_retries(
    remote: RemoteFile, part: Path, retries: int, timeout: float, backoff: float, progress: bool
) -> None:
    bar = tqdm(
        total=remote.size,
        desc=remote.filename,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
    )
    with bar:
        problem = ""
        for attempt in range(retries + 1):
            if attempt:
                delay = backoff * 2 ** (attempt - 1)
                log.warning(
                    "%s: %s; retry %d of %d in %.1f s",
                    remote.filename,
                    problem,
                    attempt,
                    retries,
                    delay,
                )
                time.sleep(delay)
            problem = _fetch_once(remote, part, timeout, bar)
            if not problem:
                return
    raise DownloadError(
        f"{remote.filename}: download from {remote.url} failed after {retries + 1} attempts: "
        f"{problem}"
    )


def _fetch_once(remote: RemoteFile, part: Path, timeout: float, bar: tqdm) -> str:
    """Make one request, appending to part; return "" when part is complete, else why not."""
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None:
        if offset > remote.size:
            log.warning("%s is larger than the file (%d bytes), restarting", part, remote.size)
            part.unlink()
            offset = 0
        elif part.exists() and offset == remote.size:
            return ""  # all bytes are there; the checksum decides whether they are right
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(remote.url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:
            return _range_not_satisfiable(remote, part, offset, exc.headers, timeout, bar)
        if exc.code >= 500 or exc.code in _RETRY_STATUSES:
            return f"HTTP {exc.code} {exc.reason}"
        raise DownloadError(
            f"{remote.filename}: GET {remote.url}: expected HTTP 200 or 206, got HTTP {exc.code} "
            f"{exc.reason}"
        ) from exc
    except (OSError, http.client.HTTPException) as exc:
        return f"request failed ({type(exc).__name__}: {exc})"
    with response:
        if response.status == 206:
            start = _content_range(response.headers.get("Content-Range"))[0]
            if start != offset:
                part.unlink(missing_ok=True)
                if not offset:  # no Range was sent, so starting over cannot help
                    return f"HTTP 206 from byte {start} to a request for the whole file"
                log.warning("%s: asked for byte %d, got %s; restarting", part, offset, start)
                return _fetch_once(remote, part, timeout, bar)
            mode = "ab"
        else:
            if offset:
                log.info("%s: the server ignored the Range header; restarting from 0", part)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        body_size = int(length) if length and length.isdigit() else None
        bar.n = offset
        bar.refresh()
        received, problem = _stream(response, part, mode, bar)
    total = offset + received
    if not problem and body_size is not None and received < body_size:
        problem = f"truncated (expected {offset + body_size} bytes, got {total})"
    if not problem and remote.size is not None and total != remote.size:
        if total > remote.size:
            part.unlink()
            raise DownloadError(
                f"{remote.filename}: GET {remote.url}: expected {remote.size} bytes, got {total}; "
                "deleted the download"
            )
        problem = f"truncated (expected {remote.size} bytes, got {total})"
    return problem


def _stream(
    response: http.client.HTTPResponse, part: Path, mode: str, bar: tqdm
) -> tuple[int, str]:
    """Copy the body to part chunk by chunk; return the bytes written and any transient problem."""
    received = 0
    with part.open(mode) as out:
        while True:
            # Network errors are transient; a failing write (disk full) is not, so it propagates.
            try:
                chunk = response.read(CHUNK_SIZE)
            except (OSError, http.client.HTTPException) as exc:
                return received, f"connection lost ({type(exc).__name__}: {exc})"
            if not chunk:
                return received, ""
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))


def _range_not_satisfiable(
    remote: RemoteFile, part: Path, offset: int, headers: Message, timeout: float, bar: tqdm
) -> str:
    # 416 means the part reaches the end of the server's file: complete if the sizes agree,
    # otherwise the part is stale (say, the file changed) and the download starts over.
    expected = (
        remote.size if remote.size is not None else _content_range(headers.get("Content-Range"))[1]
    )
    if expected is None or offset == expected:
        return ""
    if not offset:  # no Range was sent, so starting over cannot help
        return f"HTTP 416 to a request for the whole file (expected {expected} bytes)"
    log.warning("%s: %d bytes but the file has %d; restarting", part, offset, expected)
    part.unlink(missing_ok=True)
    return _fetch_once(remote, part, timeout, bar)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` or ``bytes */TOTAL`` into (START, TOTAL)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[len("bytes ") :].partition("/")
    start = span.partition("-")[0]
    return (
        int(start) if start.isdigit() else None,
        int(total) if total.isdigit() else None,
    )


def _select(files: list[RemoteFile], wanted: Sequence[str] | None, source: str) -> list[RemoteFile]:
    if wanted is None:
        return files
    if isinstance(wanted, str):  # a lone name would otherwise be iterated letter by letter
        wanted = (wanted,)
    chosen: list[RemoteFile] = []
    missing: list[str] = []
    for name in wanted:
        matches = [f for f in files if f.filename == name] or [
            f for f in files if Path(f.filename).stem == name
        ]
        if not matches:
            missing.append(name)
        chosen.extend(f for f in matches if f not in chosen)
    if missing:
        names = ", ".join(sorted(f.filename for f in files)) or "(none)"
        raise DownloadError(
            f"{source} has no file named {', '.join(missing)}; available files: {names}"
        )
    return chosen


def _check_sizes(zf: zipfile.ZipFile, archive: Path, dest: Path, max_bytes: int) -> None:
    """Refuse an archive whose members unpack to more than ``max_bytes`` (a zip bomb) or more
    than the free space of ``dest``. zipfile stops each member at its declared size, so the
    declared sizes bound what extraction writes."""
    total = sum(info.file_size for info in zf.infolist())
    if total > max_bytes:
        raise DownloadError(
            f"{archive.name} ({archive}): expected at most {max_bytes} bytes unpacked, the "
            f"archive declares {total}; refusing to extract (raise max_extract_bytes if it is "
            f"genuine)"
        )
    free = shutil.disk_usage(dest).free
    if total > free:
        raise DownloadError(
            f"{archive.name} ({archive}): needs {total} bytes unpacked, {dest} has {free} free"
        )


def _extract_zip(archive: Path, dest: Path, max_bytes: int = MAX_EXTRACT_BYTES) -> None:
    marker = dest / f".{archive.name}.extracted"
    # A marker older than the zip means the zip was downloaded again since, so unzip again.
    if marker.exists() and marker.stat().st_mtime >= archive.stat().st_mtime:
        log.info("%s already extracted, skipping", archive)
        return
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for name in names:
                _check_member(name, archive)
            _check_sizes(zf, archive, dest, max_bytes)
            top = archive.stem
            # Members go to dest/<stem>/ either way; do not nest a zip that has that folder already.
            nested = bool(names) and all(PurePosixPath(n).parts[:1] == (top,) for n in names)
            log.info("extracting %s into %s", archive, dest / top)
            zf.extractall(dest if nested else dest / top)
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"{archive.name} ({archive}): expected a zip archive, got an unreadable one ({exc})"
        ) from exc
    marker.write_text(f"{archive.name}\n")


def _check_member(name: str, archive: Path) -> None:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DownloadError(
            f"{archive.name} ({archive}): expected member paths inside the archive, got "
            f"{name!r}; refusing to extract"
        )
