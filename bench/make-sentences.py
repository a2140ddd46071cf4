#!/usr/bin/env python3
"""Writes the benchmark sentence sets from real English text shipped by Debian packages.

    .bench-venv/bin/python bench/make-sentences.py            # both files
    .bench-venv/bin/python bench/make-sentences.py --no-100k  # only the 2k file

Outputs (kept out of git, see .gitignore):
  bench/data/sentences-2k.txt    2,000 sentences, all from the fortune databases
  bench/data/sentences-100k.txt  100,000 distinct sentences from all three sources below

Rules for every line: one English sentence, ASCII, no blank lines, 5 to 70 tokens as counted
by the all-MiniLM-L6-v2 tokenizer ([CLS] and [SEP] included, no truncation). Deterministic:
the same package versions and seed give byte-identical files.

Sources (Debian 12 packages; the script installs them with apt-get when run as root, or
prints the command):
  fortunes, fortunes-min  the classic BSD fortune(6) databases: quotes, jokes, aphorisms
                          (BSD licence; /usr/share/doc/fortunes/copyright)
  fortune-anarchism       the BLAG fortune assortment: political quotes (public domain)
  bible-kjv               the King James Bible, 1611 (public domain; the Debian packaging
                          is GPL-2+), read through its `bible` command
  wordnet-base            WordNet 3.0's usage examples, the quoted sentences in the glosses
                          (Princeton WordNet licence, BSD-like)

The fortunes alone give about 27,000 distinct sentences: enough for the 2k file, not for the
100k file. The 100k file therefore mixes them (all of them) with KJV sentences and WordNet
usage examples, shuffled together; its length distribution is shorter than the 2k file's
(WordNet examples are short). Both distributions are printed at the end.

Needs `tokenizers` (from bench/setup-python.sh's venv) and the model folder
models/all-MiniLM-L6-v2 (scripts/fetch-minilm.sh).
"""
import argparse
import collections
import glob
import os
import random
import re
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIN_TOKENS, MAX_TOKENS = 5, 70
SEED = 20240611

FORTUNE_DIR = "/usr/share/games/fortunes"
# Fortune files left out: ASCII pictures, and a file of deliberately mangled/foreign text.
FORTUNE_SKIP = {"ascii-art", "translate-me"}
WORDNET_FILES = ["/usr/share/wordnet/data." + p for p in ("noun", "verb", "adj", "adv")]
APT_PACKAGES = ["fortunes", "fortunes-min", "fortune-anarchism", "bible-kjv", "wordnet-base"]

# A sentence ends at . ! or ? (possibly followed by a closing quote or bracket) before a
# space and a capital letter (possibly after an opening quote or bracket).
SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(]?[A-Z])")
# Signs of code, ASCII art, e-mail headers, tables and similar non-prose.
NON_PROSE = re.compile(r"[|_~^<>{}\\#@*=]|-{3,}|\.{4,}|\bhttps?:|\bwww\.")


def sources_present():
    return (
        os.path.isfile(os.path.join(FORTUNE_DIR, "cookie"))
        and os.path.isfile(os.path.join(FORTUNE_DIR, "anarchism"))
        and shutil.which("bible") is not None
        and all(os.path.isfile(f) for f in WORDNET_FILES)
    )


def ensure_sources():
    if sources_present():
        return
    cmd = ["apt-get", "install", "-y", "--no-install-recommends"] + APT_PACKAGES
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        sys.exit("missing text sources; install them first:\n  sudo apt-get update && sudo "
                 + " ".join(cmd))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("installing " + " ".join(APT_PACKAGES) + " with apt-get", file=sys.stderr)
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)
    if not sources_present():
        sys.exit("the Debian packages were installed but their files are not where expected")


def squash(s):
    return re.sub(r"\s+", " ", s).strip()


def is_prose(s):
    """A clean, complete-looking English sentence."""
    if len(s) < 12 or not s.isascii() or not s.isprintable():
        return False
    if sum(c.isalpha() for c in s) < 0.6 * len(s):
        return False
    if NON_PROSE.search(s):
        return False
    if not (s[0].isupper() or (s[0] in "\"'(" and s[1:2].isupper())):
        return False
    return s[-1] in ".!?\"')"


def split_sentences(text):
    return [squash(s) for s in SENTENCE_END.split(squash(text))]


def fortune_sentences():
    """(file, sentence) for every prose sentence of every English fortune cookie."""
    out = []
    for path in sorted(glob.glob(os.path.join(FORTUNE_DIR, "*"))):
        name = os.path.basename(path)
        # Skip the strfile indexes (.dat), the .u8 symlinks, and the Portuguese, Spanish...
        # sets of other packages (their names contain a dot or live in subfolders).
        if "." in name or name in FORTUNE_SKIP or not os.path.isfile(path):
            continue
        with open(path, encoding="latin-1") as f:
            text = f.read()
        for cookie in re.split(r"^%\s*$", text, flags=re.M):
            # Drop attribution lines ("-- Mark Twain") and lines indented like poems' credits.
            lines = [l for l in cookie.split("\n") if not re.match(r"^\s*--", l)]
            for s in split_sentences(" ".join(lines)):
                if is_prose(s):
                    out.append(("fortunes/" + name, s))
    return out


def kjv_sentences():
    """Sentences of the King James Bible, from the `bible` command (verse per line)."""
    dump = subprocess.run(["bible", "-l100000", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=True).stdout
    out = []
    for line in dump.splitlines():
        m = re.match(r"^\s*\d+ (.+)$", line)  # "  12 And God said, ..."; headings have no number
        if m:
            out.extend(("kjv", s) for s in split_sentences(m.group(1)) if is_prose(s))
    if len(out) < 20000:
        sys.exit(f"the bible command gave only {len(out)} sentences; is bible-kjv-text installed?")
    return out


def wordnet_examples():
    """The quoted usage examples of WordNet's glosses: `... | definition; "example"`."""
    out = []
    for path in WORDNET_FILES:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                gloss = line.partition("| ")[2]
                for q in re.findall(r'"([^"]+)"', gloss):
                    q = squash(q)
                    if q.isascii() and q.isprintable() and not NON_PROSE.search(q):
                        out.append(("wordnet", q))
    return out


def load_tokenizer():
    try:
        from tokenizers import Tokenizer
    except ImportError:
        sys.exit("`tokenizers` is missing: run bash bench/setup-python.sh and use "
                 ".bench-venv/bin/python")
    path = os.path.join(REPO, "models", "all-MiniLM-L6-v2", "tokenizer.json")
    if not os.path.isfile(path):
        sys.exit(f"{path} is missing: run scripts/fetch-minilm.sh")
    tok = Tokenizer.from_file(path)
    tok.no_truncation()
    tok.no_padding()
    return tok


def with_lengths(tok, pairs):
    """Distinct sentences within the token limits: {sentence: (source, tokens)}, first source wins."""
    seen = {}
    texts = [s for _, s in pairs]
    lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=True)]
    for (src, s), n in zip(pairs, lengths):
        if MIN_TOKENS <= n <= MAX_TOKENS and s not in seen:
            seen[s] = (src, n)
    return seen


def describe(name, lines, info):
    lens = sorted(info[s][1] for s in lines)
    print(f"\n{name}: {len(lines)} sentences, tokens min {lens[0]} / median "
          f"{statistics.median(lens):g} / mean {statistics.mean(lens):.1f} / p90 "
          f"{lens[int(0.9 * (len(lens) - 1))]} / max {lens[-1]}, total {sum(lens)} tokens")
    edges = [5, 10, 15, 20, 25, 30, 40, 50, 60, 71]
    width = 50
    counts = [sum(lo <= n < hi for n in lens) for lo, hi in zip(edges, edges[1:])]
    for (lo, hi), c in zip(zip(edges, edges[1:]), counts):
        bar = "#" * round(width * c / max(counts))
        print(f"  {lo:>2}-{hi - 1:<2} tokens {c:>7} {100 * c / len(lens):5.1f}%  {bar}")
    by_src = collections.Counter(info[s][0].split("/")[0] for s in lines)
    print("  sources: " + ", ".join(f"{k} {v}" for k, v in by_src.most_common()))


def write_lines(path, lines):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for s in lines:
            assert s and "\n" not in s and "\r" not in s and s == s.strip()
            f.write(s + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=os.path.join(HERE, "data"))
    ap.add_argument("--small", type=int, default=2000, help="size of the small set [2000]")
    ap.add_argument("--large", type=int, default=100000, help="size of the large set [100000]")
    ap.add_argument("--no-100k", action="store_true", help="write only the small set")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()

    ensure_sources()
    tok = load_tokenizer()
    os.makedirs(args.out_dir, exist_ok=True)

    fortunes = with_lengths(tok, fortune_sentences())
    # sorted() before sampling: set/dict order of strings must not decide anything.
    pool = sorted(fortunes)
    if len(pool) < args.small:
        sys.exit(f"only {len(pool)} fortune sentences fit the rules; need {args.small}")
    small = random.Random(args.seed).sample(pool, args.small)
    info = dict(fortunes)
    small_name = "sentences-2k.txt" if args.small == 2000 else f"sentences-{args.small}.txt"
    write_lines(os.path.join(args.out_dir, small_name), small)
    describe(small_name, small, info)

    if not args.no_100k:
        extra = with_lengths(tok, kjv_sentences() + wordnet_examples())
        for s, v in extra.items():
            info.setdefault(s, v)
        everything = sorted(info)
        if len(everything) < args.large:
            sys.exit(f"only {len(everything)} distinct sentences fit the rules; need {args.large}")
        # All fortune sentences go in; the rest is filled from KJV and WordNet at random.
        others = [s for s in everything if not info[s][0].startswith("fortunes")]
        rng = random.Random(args.seed + 1)
        take = pool[: args.large] + rng.sample(others, max(0, args.large - len(pool)))
        rng.shuffle(take)
        large_name = "sentences-100k.txt" if args.large == 100000 else f"sentences-{args.large}.txt"
        write_lines(os.path.join(args.out_dir, large_name), take)
        describe(large_name, take, info)
        print(f"  (pool: {len(everything)} distinct sentences, {len(pool)} of them fortunes)")


if __name__ == "__main__":
    main()
