"""Scores of generated replies: ROUGE-L's longest common subsequence against a plain dynamic programme, BLEU and chrF
through sacrebleu, and the TF-IDF intent classifier in NumPy. No model, no TensorFlow."""

import random

import pytest

from tfglm.generation.scores import (IntentClassifier, intent_accuracy, longest_common_subsequence, reply_scores,
                                     rouge_l, words)


def reference_lcs(a, b):
    """The textbook O(len(a) * len(b)) table."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_longest_common_subsequence_matches_the_textbook_table():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 12))]
        assert longest_common_subsequence(a, b) == reference_lcs(a, b), (a, b)


def test_rouge_l_is_the_f_measure_of_the_common_subsequence_over_lowercased_words():
    assert words("Hello, World! Order #42.") == ["hello", "world", "order", "42"]
    # 5 words in common in order out of 6 each: precision = recall = 5/6.
    assert rouge_l("The cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # 2 of the reply's 2 words, 2 of the reference's 4: P 1, R 0.5, F 2/3.
    assert rouge_l("cat mat", "the cat the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0 and rouge_l("dog", "cat") == 0.0


def test_reply_scores_are_100_for_exact_replies_and_lower_for_others():
    references = ["your order ships tomorrow", "we refund within five days", "call us any time"]
    exact = reply_scores(references, references)
    assert (exact["bleu"], exact["chrf"], exact["rouge_l"]) == (100.0, 100.0, 100.0)
    assert exact["signature"].startswith("nrefs:1")
    other = reply_scores(["your parcel ships today", "we refund within a week", "write to us"], references)
    assert 0 < other["bleu"] < 100 and 0 < other["chrf"] < 100 and 0 < other["rouge_l"] < 100


def test_intent_classifier_picks_the_nearest_intent_and_reports_its_own_held_out_accuracy():
    references = ["to cancel your order open orders and press cancel", "we can cancel the order for you now",
                  "cancel it from the orders page", "track your parcel with the tracking number",
                  "the tracking page shows where your parcel is", "your parcel can be tracked online"]
    intents = ["cancel"] * 3 + ["track"] * 3
    classifier = IntentClassifier(references, intents)
    assert classifier.predict(["press cancel on the order", "where is the parcel"]) == ["cancel", "track"]
    assert classifier.held_out_accuracy() == 1.0
    replies = ["open orders and press cancel", "cancel the order now", "track the parcel", "the parcel page",
               "the tracking number", "cancel it"]  # the third and the last answer another intent
    scored = intent_accuracy(replies, references, intents)
    assert scored == {"intent_accuracy": 0.6667, "intent_classifier_accuracy": 1.0, "intents": 2}
    # Rows without an intent are left out of both.
    assert intent_accuracy(replies + ["x"], references + ["y"], intents + [None]) == scored
