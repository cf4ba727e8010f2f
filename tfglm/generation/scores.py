"""Scores of generated replies against reference replies: corpus BLEU and chrF (sacrebleu), ROUGE-L, and whether a
reply addresses the reference's intent.

ROUGE-L is computed here, as Google's `rouge-score` package computes its `rougeL` (lower-cased alphanumeric words, no
stemming, the F-measure of the longest common subsequence, averaged over replies): that package is an sdist last
released in 2022 that imports NLTK (and six) for a stemmer this measure does not use, and its subsequence is a pure
Python double loop; here it is a few NumPy lines.
"""

import re

import numpy as np

WORD = re.compile(r"[a-z0-9]+")


def words(text):
    """`rouge-score`'s tokens: lower-cased runs of letters and digits."""
    return WORD.findall(text.lower())


def longest_common_subsequence(a, b):
    """The length of the longest common subsequence of token lists `a` and `b`, one NumPy row of the dynamic
    programme per token of `a`: a row is the running maximum of (the row above, the diagonal plus a match)."""
    if not a or not b:
        return 0
    vocabulary = {token: i for i, token in enumerate(set(a) | set(b))}
    b_ids = np.array([vocabulary[token] for token in b])
    row = np.zeros(len(b) + 1, np.int32)
    for token in a:
        row[1:] = np.maximum.accumulate(np.maximum(row[1:], row[:-1] + (b_ids == vocabulary[token])))
    return int(row[-1])


def rouge_l(reply, reference):
    """ROUGE-L F-measure of `reply` against `reference` (0 to 1)."""
    a, b = words(reply), words(reference)
    common = longest_common_subsequence(a, b)
    if not common:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)


def reply_scores(replies, references):
    """{"bleu", "chrf", "rouge_l", "signature"}: corpus BLEU and chrF (sacrebleu's defaults, 0-100), mean ROUGE-L
    (0-100), and BLEU's sacrebleu signature."""
    import sacrebleu

    bleu = sacrebleu.metrics.BLEU()
    return {"bleu": round(bleu.corpus_score(replies, [references]).score, 2),
            "chrf": round(sacrebleu.metrics.CHRF().corpus_score(replies, [references]).score, 2),
            "rouge_l": round(100 * float(np.mean([rouge_l(r, ref) for r, ref in zip(replies, references)])), 2),
            "signature": str(bleu.get_signature())}


class IntentClassifier:
    """The intent of a text: that of the nearest intent centroid of reference texts, in TF-IDF space (sublinear term
    frequencies, smoothed inverse document frequencies, unit vectors: scikit-learn's
    `TfidfVectorizer(sublinear_tf=True)`), in NumPy.

    Examples:
    ```python
    from tfglm.generation.scores import IntentClassifier

    classifier = IntentClassifier(["cancel my order", "stop the order", "where is my parcel", "track my parcel"],
                                  ["cancel", "cancel", "track", "track"])
    assert classifier.predict(["please cancel it", "my parcel?"]) == ["cancel", "track"]
    ```
    """

    def __init__(self, texts, intents):
        tokens = [words(text) for text in texts]
        self.vocabulary = {word: i for i, word in enumerate(sorted({w for t in tokens for w in t}))}
        frequency = np.zeros(len(self.vocabulary))
        for t in tokens:
            frequency[[self.vocabulary[w] for w in set(t)]] += 1
        self.idf = np.log((1 + len(texts)) / (1 + frequency)) + 1
        self.intents = sorted(set(intents))
        self.labels = np.array([self.intents.index(intent) for intent in intents])
        self.references = self.vectors(tokens)
        self.sums = np.zeros((len(self.intents), len(self.vocabulary)))
        np.add.at(self.sums, self.labels, self.references)
        self.centroids = unit(self.sums)

    def vectors(self, tokens):
        """Unit TF-IDF vectors [texts, vocabulary] of token lists (words outside the vocabulary left out)."""
        out = np.zeros((len(tokens), len(self.vocabulary)))
        for row, t in enumerate(tokens):
            ids, counts = np.unique([self.vocabulary[w] for w in t if w in self.vocabulary], return_counts=True)
            out[row, ids.astype(int)] = 1 + np.log(counts)
        return unit(out * self.idf)

    def predict(self, texts, batch_size=512):
        """The intent of each text."""
        predicted = []
        for start in range(0, len(texts), batch_size):
            scores = self.vectors([words(t) for t in texts[start:start + batch_size]]) @ self.centroids.T
            predicted += [self.intents[i] for i in scores.argmax(axis=1)]
        return predicted

    def held_out_accuracy(self):
        """The share of the reference texts whose intent is predicted right by centroids made without them (leave
        one out): how far the classifier can be trusted on texts it has not seen."""
        right = 0
        for vector, label in zip(self.references, self.labels):
            centroids = self.sums.copy()
            centroids[label] -= vector
            right += int((unit(centroids) @ vector).argmax() == label)
        return right / len(self.labels)


def unit(vectors):
    """`vectors` [n, dim] scaled to unit length (zero rows stay zero)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def intent_accuracy(replies, references, intents):
    """{"intent_accuracy", "intent_classifier_accuracy", "intents"}: the share of replies whose intent, by an
    `IntentClassifier` of the references, is their reference's, and that classifier's held-out accuracy on the
    references (how far the first can be trusted); only rows with an intent (not None) count."""
    rows = [i for i, intent in enumerate(intents) if intent is not None]
    gold = [intents[i] for i in rows]
    classifier = IntentClassifier([references[i] for i in rows], gold)
    right = np.array(classifier.predict([replies[i] for i in rows])) == np.array(gold)
    return {"intent_accuracy": round(float(right.mean()), 4),
            "intent_classifier_accuracy": round(classifier.held_out_accuracy(), 4), "intents": len(classifier.intents)}
