"""The photographs PURE-tiny trains on: where each comes from, its licence, and the train / held-out split.

Two kinds of source, both offline once fetched and both under free licences:

- photos bundled in Python packages (scikit-image, scikit-learn, matplotlib): the original 20;
- wallpaper packages from Debian's main archive, fetched with ``apt-get download`` (no root needed)
  and unpacked with ``dpkg-deb -x`` into a cache folder:

      python -m pure_lite.train.photo_sources fetch ~/.cache/pure-lite-photos

Only the files listed in ``DEBIAN_PHOTOS`` are used: each was looked at by hand (a photograph,
not a render, illustration or abstract art) and its licence and author copied from the package's
``usr/share/doc/<package>/copyright`` (and, for Plasma's wallpapers, each wallpaper's
``metadata.json``, which names the author and licence per image). Everything else those packages
ship is ignored, so a package update that adds a render cannot slip into training.

The split is *by photo*, decided before any crop is cut, and deterministic: the bundled photos
keep the held-out set of PURE-tiny v1 (so old and new numbers compare), and each Debian photo is
held out when the SHA-256 of its key ("package:path") falls in the lowest ``HELD_OUT_PERCENT``
percent, which does not depend on the order of the list or on which other photos exist.

This module needs only the standard library; loading the photos is the caller's business.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import PureLiteError

HELD_OUT_PERCENT = 20
BUNDLED_HELD_OUT = frozenset({"chelsea", "coffee", "flower", "grace_hopper"})  # PURE-tiny v1's held-out photos


class PhotoSourceError(PureLiteError, RuntimeError):
    """A photo package could not be fetched or unpacked, or a listed photo is missing from it."""


@dataclass(frozen=True)
class Photo:
    """One photograph: where it lives, who made it and under which licence it may be used."""

    source: str  # Debian package, or "scikit-image" / "scikit-learn" / "matplotlib"
    path: str  # inside the unpacked package (or the Python package's data folder)
    licence: str  # SPDX-style identifier as the copyright file gives it
    author: str  # as the copyright file gives it ("" when it names none)

    @property
    def key(self) -> str:
        """Stable identity of the photo: the split and the pack refer to photos by this."""
        return f"{self.source}:{self.path}"

    @property
    def name(self) -> str:
        """A short file-system-safe name, unique within ``all_photos()``."""
        stem = Path(self.path).stem if self.source in _PY_SOURCES else Path(self.path).parts[-4] \
            if self.path.startswith("usr/share/wallpapers/") else Path(self.path).stem
        return f"{self.source}-{stem}".replace(" ", "_")


_PY_SOURCES = ("scikit-image", "scikit-learn", "matplotlib")


def _bundled() -> tuple[Photo, ...]:
    """The photos shipped inside Python packages (their data READMEs give sources and licences)."""
    ski = [  # licences as skimage.data's docstrings state them
        ("astronaut.png", "public domain (NASA)", "NASA"),
        ("chelsea.png", "CC0-1.0", "Stefan van der Walt"),
        ("coffee.png", "CC0-1.0", "Rachel Michetti"),
        ("rocket.jpg", "public domain (SpaceX)", "SpaceX"),
        ("motorcycle_left.png", "Middlebury 2014 stereo benchmark (no licence stated)", "N. Nesic, D. Scharstein et al."),
        ("motorcycle_right.png", "Middlebury 2014 stereo benchmark (no licence stated)", "N. Nesic, D. Scharstein et al."),
        ("hubble_deep_field.jpg", "public domain (NASA)", "NASA"),
        ("retina.jpg", "CC0-1.0", "Wikimedia Commons"),
        ("ihc.png", "no known copyright restrictions", "CMMI"),
        ("camera.png", "CC0-1.0", "Lav Varshney"),
        ("brick.png", "CC0-1.0", "CC0Textures"),
        ("grass.png", "CC0-1.0", "linolafett"),
        ("gravel.png", "CC0-1.0", "CC0Textures"),
        ("moon.png", "no licence stated (scikit-image data)", ""),
        ("coins.png", "no known copyright restrictions", "Brooklyn Museum"),
        ("page.png", "no licence stated (scikit-image data)", ""),
        ("text.png", "public domain", "Wikipedia"),
    ]
    photos = [Photo("scikit-image", f"data/{f}", lic, who) for f, lic, who in ski]
    photos += [Photo("scikit-learn", "datasets/images/china.jpg", "CC-BY-2.0", "danielbuechele (Flickr)"),
               Photo("scikit-learn", "datasets/images/flower.jpg", "CC-BY-2.0", "vultilion (Flickr)"),
               Photo("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (US Navy)", "US Navy")]
    return tuple(photos)


def _lomiri(version: str, file: str, licence: str, author: str) -> Photo:
    return Photo(f"lomiri-wallpapers-{version}", f"usr/share/backgrounds/{file}", licence, author)


def _mate(file: str, author: str) -> Photo:
    return Photo("mate-backgrounds", f"usr/share/backgrounds/mate/nature/{file}", "GPL-2.0-or-later", author)


def _plasma(name: str, image: str, author: str) -> Photo:
    # debian/copyright: "Files: *" GPL-2+ (KDE VDG); each wallpaper's metadata.json says LGPLv3
    return Photo("plasma-workspace-wallpapers", f"usr/share/wallpapers/{name}/contents/images/{image}",
                 "LGPL-3.0 (metadata.json; debian/copyright: GPL-2.0-or-later)", author)


def _lxqt(file: str, author: str) -> Photo:
    return Photo("lxqt-themes", f"usr/share/lxqt/wallpapers/{file}", "LGPL-2.1-or-later", author)


DEBIAN_PHOTOS: tuple[Photo, ...] = (
    # lomiri-wallpapers 20.04.0-2 (Debian 12): the umang (render), analogpattern (unclear),
    # Fossa, Infinite-Sea and Painting-Colors (renders) and warty-final-ubuntu files are left out
    _lomiri("16.04", "Bridge_by_Sander_Klootwijk.jpg", "CC-BY-SA-4.0", "Sander Klootwijk"),
    _lomiri("16.04", "Dragonfly_by_Bolly.jpg", "CC-BY-SA-4.0", '"Bolly"'),
    _lomiri("16.04", "Picture_0B_by_freespace.jpg", "CC-BY-4.0", 'Trevor "Freespace"'),
    _lomiri("16.04", "Picture_1A_by_freespace.jpg", "CC-BY-4.0", 'Trevor "Freespace"'),
    _lomiri("16.04", "Wine_by_Jakkub_Mede.jpg", "CC-BY-4.0", "Jakub Mede"),
    _lomiri("16.04", "aitzgorri_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("16.04", "free_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich"),
    _lomiri("16.04", "friends_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("16.04", "greentock_by_Peter_Nerlich.jpg", "CC-BY-SA-4.0", "Peter Nerlich"),
    _lomiri("16.04", "life_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("16.04", "picosdeeuropa_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("16.04", "seeding_by_Clements_Engelhardt.jpg", "CC0-1.0", "Clemens Engelhardt"),
    _lomiri("16.04", "sunset_by_Aitzol_Berasategi.jpg", "CC-BY-4.0", "Aitzol Berasategi"),
    _lomiri("20.04", "Kleiber_by_Lukas_Baubkus.jpg", "CC-BY-SA-3.0", "Lukas Baubkus"),
    # mate-backgrounds 1.26.0-1: the nature/ folder (abstract/ and desktop/ are art)
    _mate("Aqua.jpg", "Charles Barbin"),
    _mate("Blinds.jpg", "Lennart Poettering, Andrea Cimitan"),
    _mate("Dune.jpg", "Marco Cogoni, Hylke Bons"),
    _mate("FreshFlower.jpg", "Jens Ansorg"),
    _mate("Garden.jpg", "Charles Barbin"),
    _mate("GreenMeadow.jpg", "Timothy Schellhase, Lapo Calamandrei"),
    _mate("LadyBird.jpg", "Charles Barbin"),
    _mate("RainDrops.jpg", '"blackcombwhistler07"'),
    _mate("Storm.jpg", "Sergey Nazarov"),
    _mate("TwoWings.jpg", "Charles Barbin, Hylke Bons"),
    _mate("Wood.jpg", "Jean-François Fortin Tam"),
    _mate("YellowFlower.jpg", "Charles Barbin"),
    # plasma-workspace-wallpapers 4:5.27.5-2: the photographs among its 30 wallpapers
    _plasma("BytheWater", "2560x1600.jpg", "Maciej Wiklo"),
    _plasma("ColdRipple", "2560x1600.jpg", "Risto Saukonpää"),
    _plasma("ColorfulCups", "2560x1600.jpg", "Dmitri Popov"),
    _plasma("DarkestHour", "2560x1600.jpg", "Risto Saukonpää"),
    _plasma("EveningGlow", "2560x1600.jpg", "Ian Hex"),
    _plasma("FallenLeaf", "2560x1600.jpg", "Martin Klapetek"),
    _plasma("Grey", "2560x1600.jpg", "Sigi Sagi"),
    _plasma("Kite", "2560x1600.jpg", "Risto Saukonpää"),
    _plasma("OneStandsOut", "2560x1600.jpg", "Risto Saukonpää"),
    _plasma("Path", "2560x1600.jpg", "Risto Saukonpää"),
    _plasma("summer_1am", "2560x1600.jpg", "Risto Saukonpää"),
    # lxqt-themes 1.2.0-1: "Files: *" (LGPL-2.1+, Razor / LXQt team) covers wallpapers/
    _lxqt("Butterfly-Kenneth-Wimer.jpg", "Kenneth Wimer"),
    _lxqt("after-the-rain.jpg", "LXQt team"),
    _lxqt("fog.jpg", "LXQt team"),
    _lxqt("this-is-not-windows.jpg", "LXQt team"),
    _lxqt("flowers.png", "LXQt team"),
)

BUNDLED_PHOTOS: tuple[Photo, ...] = _bundled()

# Checked and rejected (renders, illustrations, abstract art, logos): gnome-backgrounds 43.1 (all),
# ukui-wallpapers 20.04.3 (all), sway-backgrounds 1.7 (all), desktop-base, debian-edu-artwork.
# enlightenment-data ships photographs, but inside .edj archives this module cannot read.
DEBIAN_PACKAGES: tuple[str, ...] = tuple(sorted({p.source for p in DEBIAN_PHOTOS}))


def all_photos() -> tuple[Photo, ...]:
    return BUNDLED_PHOTOS + DEBIAN_PHOTOS


def is_held_out(photo: Photo) -> bool:
    """Whether this photo belongs to the held-out set (never trained on)."""
    if photo.source in _PY_SOURCES:
        return Path(photo.path).stem in BUNDLED_HELD_OUT
    digest = hashlib.sha256(photo.key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def split(photos: tuple[Photo, ...] | None = None) -> dict[str, list[Photo]]:
    """{"train": [...], "heldout": [...]}, each in the order given."""
    photos = all_photos() if photos is None else photos
    return {"train": [p for p in photos if not is_held_out(p)], "heldout": [p for p in photos if is_held_out(p)]}


# ----------------------------------------------------------------------------- fetching and finding


def _python_data_root(source: str) -> Path:
    """The data folder a bundled photo's ``path`` is relative to (imports the package)."""
    import importlib.util

    module = {"scikit-image": "skimage", "scikit-learn": "sklearn", "matplotlib": "matplotlib"}[source]
    spec = importlib.util.find_spec(module)  # finds the folder without running the package's imports
    if spec is None or spec.origin is None:
        raise PhotoSourceError(f"{source} is not installed (its bundled photos are training data): "
                               "pip install -e '.[pure-tiny]'")
    return Path(spec.origin).parent


def fetch(cache: str | os.PathLike, packages: tuple[str, ...] = DEBIAN_PACKAGES, *, log=print) -> Path:
    """Download and unpack every photo package into CACHE/<package>/ (skipped when already there).

    Uses ``apt-get download`` (which needs no root, only the system's apt sources) and
    ``dpkg-deb -x``; the .deb files are deleted after unpacking. Returns CACHE.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PhotoSourceError(f"{tool} not found: the photo packages come from a Debian/Ubuntu archive")
    for package in packages:
        dest = cache / package
        if (dest / "usr").is_dir():
            continue
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            log(f"downloading {package}")
            run = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if run.returncode or not debs:
                raise PhotoSourceError(f"apt-get download {package} failed: {run.stderr.strip() or run.stdout.strip()}")
            unpacked = Path(tmp) / "x"
            run = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], capture_output=True, text=True)
            if run.returncode:
                raise PhotoSourceError(f"dpkg-deb -x {debs[0].name} failed: {run.stderr.strip()}")
            os.replace(unpacked, dest)  # a package folder exists only once it is complete
    return cache


def locate(photo: Photo, cache: str | os.PathLike | None) -> Path:
    """The file of ``photo`` on this machine; PhotoSourceError when it is not there."""
    if photo.source in _PY_SOURCES:
        path = _python_data_root(photo.source) / photo.path
    else:
        if cache is None:
            raise PhotoSourceError(f"{photo.key} is in a Debian package: give the cache folder that "
                                   "`python -m pure_lite.train.photo_sources fetch CACHE` filled")
        path = Path(cache) / photo.source / photo.path
    if not path.is_file():
        raise PhotoSourceError(f"{photo.key}: {path} does not exist (run `python -m pure_lite.train.photo_sources "
                               "fetch CACHE` first, or the package changed)")
    return path


def licence_table(photos: tuple[Photo, ...] | None = None) -> str:
    """A Markdown table of every photo, its split, licence and author (for the model card)."""
    parts = split(photos)
    lines = ["| split | source | file | licence | author |", "| --- | --- | --- | --- | --- |"]
    for name in ("train", "heldout"):
        for p in parts[name]:
            lines.append(f"| {name} | {p.source} | `{p.path}` | {p.licence} | {p.author or '–'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pure_lite.train.photo_sources",
                                 description="fetch PURE-tiny's photo packages, or print their licence table")
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="apt-get download + dpkg-deb -x every photo package into CACHE")
    f.add_argument("cache", type=Path)
    sub.add_parser("table", help="print the Markdown table of photos, splits and licences")
    args = ap.parse_args(argv)
    if args.command == "fetch":
        cache = fetch(args.cache)
        missing = [p.key for p in DEBIAN_PHOTOS if not (cache / p.source / p.path).is_file()]
        if missing:
            raise PhotoSourceError(f"listed photos missing from the unpacked packages: {missing}")
        print(f"{len(DEBIAN_PHOTOS)} photos from {len(DEBIAN_PACKAGES)} packages in {cache}")
    else:
        sys.stdout.write(licence_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
