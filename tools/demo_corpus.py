"""The demo model's text: the King James Bible and fortune cookies, taken from Debian packages.

Nothing here needs root: packages are fetched with `apt-get download` and unpacked with
`dpkg-deb -x` into a work directory; the Bible text is read out of `bible-kjv-text`'s compressed
data file by the `bible` program of `bible-kjv`, run from where it was unpacked. The corpus is a
list of chapters and fortunes that can be saved as JSON lines, so a run can also start from a
corpus file instead of the network (the tests do, with the held-out file shipped with the model).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
FORTUNE_PACKAGES = ("fortunes-min", "fortunes")
# Fortune files of mostly English prose. Left out: program code and ASCII art (computers, linux,
# perl, ascii-art), song lyrics and quotes from modern franchises (songs-poems, startrek, zippy,
# pratchett), IRC logs and in-jokes (knghtbrd, linuxcookie, debian), and the edgier files.
FORTUNE_FILES = {
    "fortunes-min": ("fortunes", "literature", "riddles"),
    "fortunes": (
        "art", "cookie", "definitions", "education", "food", "goedel", "humorists", "kids", "law",
        "love", "magic", "medicine", "miscellaneous", "paradoxum", "people", "pets", "platitudes",
        "science", "sports", "wisdom", "work",
    ),
}
MAX_FORTUNE_CHARS = 600
# One item in every HELDOUT_EVERY (chapters and fortunes counted separately, in corpus order) is
# held out of training; the model's perplexity is measured on exactly those items.
HELDOUT_EVERY = 25
HELDOUT_OFFSET = 12

KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah",
    "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah", "Jonah",
    "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi", "Matthew", "Mark",
    "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
    "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John",
    "Jude", "Revelation",
)
_VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


@dataclass(frozen=True)
class Chapter:
    """One chapter of the King James Bible; `verses[i]` is verse i + 1."""

    book: str
    chapter: int
    verses: tuple[str, ...]

    def document(self) -> str:
        return f"{self.book} {self.chapter}\n" + "\n".join(self.verses)


@dataclass(frozen=True)
class Fortune:
    """One fortune cookie, cleaned to plain text; `category` is the fortune file it came from."""

    category: str
    text: str

    def document(self) -> str:
        return self.text


@dataclass
class Corpus:
    """Chapters and fortunes in a fixed order, and the Debian packages (name -> version) they came from."""

    chapters: list[Chapter] = field(default_factory=list)
    fortunes: list[Fortune] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)

    def documents(self) -> list[str]:
        return [c.document() for c in self.chapters] + [f.document() for f in self.fortunes]

    def split(self) -> tuple[Corpus, Corpus]:
        """(train, held-out): every HELDOUT_EVERY-th chapter and fortune goes to held-out."""
        def is_heldout(index: int) -> bool:
            return index % HELDOUT_EVERY == HELDOUT_OFFSET

        train = Corpus(packages=dict(self.packages))
        heldout = Corpus(packages=dict(self.packages))
        for i, chapter in enumerate(self.chapters):
            (heldout if is_heldout(i) else train).chapters.append(chapter)
        for i, fortune in enumerate(self.fortunes):
            (heldout if is_heldout(i) else train).fortunes.append(fortune)
        return train, heldout

    def save(self, path: Path) -> None:
        with path.open("w", encoding="utf-8") as out:
            for name, version in sorted(self.packages.items()):
                out.write(json.dumps({"kind": "package", "name": name, "version": version}) + "\n")
            for c in self.chapters:
                record = {"kind": "chapter", "book": c.book, "chapter": c.chapter, "verses": list(c.verses)}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            for f in self.fortunes:
                record = {"kind": "fortune", "category": f.category, "text": f.text}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> Corpus:
        corpus = cls()
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["kind"] == "package":
                corpus.packages[record["name"]] = record["version"]
            elif record["kind"] == "chapter":
                corpus.chapters.append(Chapter(record["book"], record["chapter"], tuple(record["verses"])))
            elif record["kind"] == "fortune":
                corpus.fortunes.append(Fortune(record["category"], record["text"]))
            else:
                raise ValueError(f"{path}: unknown record kind {record['kind']!r}")
        return corpus


def fetch_corpus(work_dir: Path) -> Corpus:
    """Downloads and unpacks the Debian packages into `work_dir` and reads the corpus out of them."""
    packages = fetch_packages(KJV_PACKAGES + FORTUNE_PACKAGES, work_dir)
    root = work_dir / "root"
    kjv_text = subprocess.run(
        [str(root / "usr/bin/bible"), "-f", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"],
        check=True, capture_output=True, text=True,
    ).stdout
    fortunes: list[Fortune] = []
    for package in FORTUNE_PACKAGES:
        for name in FORTUNE_FILES[package]:
            raw = (root / "usr/share/games/fortunes" / name).read_text(encoding="utf-8")
            fortunes.extend(parse_fortunes(raw, category=name))
    return Corpus(chapters=parse_kjv(kjv_text), fortunes=fortunes, packages=packages)


def fetch_packages(names: Iterable[str], work_dir: Path) -> dict[str, str]:
    """`apt-get download` each package (once) and unpack all into `work_dir/root`; name -> version."""
    debs_dir = work_dir / "debs"
    root = work_dir / "root"
    debs_dir.mkdir(parents=True, exist_ok=True)
    versions = {}
    for name in names:
        debs = sorted(debs_dir.glob(f"{name}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", name], cwd=debs_dir, check=True, capture_output=True)
            debs = sorted(debs_dir.glob(f"{name}_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"expected one {name} package in {debs_dir}, found {[d.name for d in debs]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        versions[name] = subprocess.run(
            ["dpkg-deb", "-f", str(debs[0]), "Version"], check=True, capture_output=True, text=True,
        ).stdout.strip()
    return versions


def parse_kjv(text: str) -> list[Chapter]:
    """Chapters from `bible -f` output: one verse a line, `Ge1:1 In the beginning ...`.

    The program abbreviates book names; books come in canonical order, so the n-th abbreviation
    seen is the n-th book of KJV_BOOKS.
    """
    chapters: list[Chapter] = []
    abbreviations: list[str] = []
    verses: list[str] = []
    current: tuple[str, int] | None = None
    for line in text.splitlines():
        match = _VERSE_LINE.match(line.strip())
        if match is None:
            continue
        abbreviation, chapter, verse = match.group(1), int(match.group(2)), match.group(4).strip()
        if not abbreviations or abbreviations[-1] != abbreviation:
            abbreviations.append(abbreviation)
        book = KJV_BOOKS[len(abbreviations) - 1]
        if current != (book, chapter):
            if current is not None:
                chapters.append(Chapter(current[0], current[1], tuple(verses)))
            current, verses = (book, chapter), []
        verses.append(verse)
    if current is not None:
        chapters.append(Chapter(current[0], current[1], tuple(verses)))
    return chapters


def parse_fortunes(raw: str, category: str) -> list[Fortune]:
    """Fortunes from a strfile source (entries separated by `%` lines), cleaned; odd ones dropped."""
    fortunes = []
    for entry in re.split(r"^%\n", raw, flags=re.MULTILINE):
        text = clean_fortune(entry)
        if text and len(text) <= MAX_FORTUNE_CHARS and _looks_like_prose(text):
            fortunes.append(Fortune(category, text))
    return fortunes


def clean_fortune(entry: str) -> str:
    """Plain text of one fortune: overstrikes resolved, indentation dropped, prose lines unwrapped.

    Fortunes are wrapped at ~72 columns; a long line followed by more text is joined to it, while
    short lines (verse, lists) and the `-- Author` attribution keep their own lines.
    """
    entry = re.sub(r".\x08", "", entry)
    lines = [re.sub(r"\s+", " ", line).strip() for line in entry.splitlines()]
    out: list[str] = []
    for line in lines:
        joinable = out and out[-1] and len(out[-1]) >= 50 and line and not line.startswith("--")
        if joinable:
            out[-1] = out[-1] + " " + line
        else:
            out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _looks_like_prose(text: str) -> bool:
    letters = sum(ch.isalpha() or ch in " \n.,;:'\"!?-()" for ch in text)
    return letters / len(text) >= 0.93 and len(re.findall(r"[A-Za-z]{2,}", text)) >= 3
