"""visualrwkv.eval: the official benchmark scorers, checked against values worked out by hand."""
import pytest

from visualrwkv.eval import (CONTRACTIONS, MME_COGNITION, MME_PERCEPTION, gqa_match, mme_parse, mme_scores,
                             pope_answer, pope_scores, process_digit_article, process_punctuation, scienceqa_letter,
                             vqa_accuracy, vqa_normalize)


# --- VQAv2 -------------------------------------------------------------------------------------------------------

def test_vqa_leave_one_out_two_of_ten():
    # 2 of 10 humans said "red". Leave out one of the two "red": 1 match among the other nine -> min(1/3, 1) = 1/3,
    # twice. Leave out one of the eight "blue": 2 matches -> 2/3, eight times.
    # (1/3 + 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    answers = ["red", "red"] + ["blue"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx(0.6)


def test_vqa_three_matches_is_not_full_marks():
    # 3 of 10 match: leaving out a match leaves 2 -> 2/3 (three times); otherwise 3 -> 1 (seven times).
    # (3 * 2/3 + 7 * 1) / 10 = 9 / 10
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 4 of 10: every nine still holds >= 3 matches -> 1
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == 1.0
    assert vqa_accuracy("cow", ["cat"] * 4 + ["dog"] * 6) == 0.0


def test_vqa_number_word_normalised():
    # "Two" -> lower "two" -> "2"; 9 humans said "2": every nine holds >= 8 matches -> 1.0 (a bare compare gives 0)
    assert vqa_accuracy("Two", ["2"] * 9 + ["3"]) == 1.0
    assert vqa_accuracy("  Two\n", ["2"] * 9 + ["3"]) == 1.0


def test_vqa_articles_and_full_stop():
    assert vqa_accuracy("The dog.", ["dog"] * 6 + ["puppy"] * 4) == 1.0
    assert vqa_accuracy("a dog", ["dog"] * 6 + ["puppy"] * 4) == 1.0


def test_vqa_contraction():
    # "dont" -> "don't"; 4 of 10 humans wrote "don't know" -> 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["no"] * 6) == 1.0


def test_vqa_human_answers_get_punctuation_only():
    # answers differ, so they get processPunctuation: "1,000" -> "1000" on both sides, ten matches -> 1.0
    assert vqa_accuracy("1,000", ["1000"] * 5 + ["1,000"] * 5) == 1.0
    # but never processDigitArticle: the human "two" stays "two", the prediction "two" becomes "2".
    # only the 2 human "2" count -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("two", ["two"] * 4 + ["2"] * 2 + ["3"] * 4) == pytest.approx(0.6)


def test_vqa_all_identical_answers_are_not_processed():
    # all ten "1,000": the answers are left as they are, the prediction becomes "1000": no match at all -> 0
    assert vqa_accuracy("1,000", ["1,000"] * 10) == 0.0
    # one differing answer switches processing on: nine "1000" among the ten -> 1.0
    assert vqa_accuracy("1,000", ["1,000"] * 9 + ["10"]) == 1.0


@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),                       # period not followed by a digit removed
    ("2.5", "2.5"),                        # decimal point kept
    ("black-and-white", "black and white"),  # '-' touches no space -> replaced by a space
    ("yes - no", "yes  no"),               # '-' touches a space -> removed
    ("1,000", "1000"),                     # digit,digit group -> every mark removed
    ("a,b", "a b"),
    ("what?!", "what  "),
])
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The Two dogs", "2 dogs"), ("none", "0"), ("zero ten", "0 10"), ("an apple", "apple"),
    ("isnt it", "isn't it"), ("dont", "don't"), ("somebody'd", "somebodyd"),
])
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_contraction_table_size():
    assert len(CONTRACTIONS) == 120   # entries in the table of the official vqaEval.py
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["youve"] == "you've"


@pytest.mark.parametrize("text, expected", [
    ("Two, the dogs?", "2 dogs"), ("The man's hat.", "man 's hat"), ("Yes\n", "yes"), ("1,000", "1000"),
])
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


# --- POPE --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No, there is not.", "no"), ("There is not a cat", "no"),
    ("Yes. There is no cat.", "yes"),   # only the first sentence is read
    ("Not sure", "yes"),                # "Not" is not one of No / no / not
    ("NO", "yes"), ("Nope", "yes"), ("no,", "no"),
])
def test_pope_answer(text, expected):
    assert pope_answer(text) == expected


def test_pope_scores_by_hand():
    recs = [
        # random: TP=2 (yes/yes twice), FP=1 ("Not sure" on a no), TN=1, FN=0
        dict(category="random", label="yes", prediction="Yes"),
        dict(category="random", label="yes", prediction="Yes, a cat."),
        dict(category="random", label="no", prediction="Not sure"),
        dict(category="random", label="no", prediction="No"),
        # popular: TP=0, FN=1, TN=1, FP=0 -> precision 0/0 -> 0, recall 0, F1 0
        dict(category="popular", label="yes", prediction="no"),
        dict(category="popular", label="no", prediction="There is no dog."),
    ]
    s = pope_scores(recs)
    # random: acc 3/4, precision 2/3, recall 2/2 = 1, F1 = 2 * (2/3) * 1 / (2/3 + 1) = (4/3) / (5/3) = 0.8,
    # yes-ratio 3/4
    assert s["random"] == pytest.approx(dict(accuracy=0.75, precision=2 / 3, recall=1.0, f1=0.8, yes_ratio=0.75))
    assert s["popular"] == pytest.approx(dict(accuracy=0.5, precision=0.0, recall=0.0, f1=0.0, yes_ratio=0.0))
    assert s["mean_f1"] == pytest.approx(0.4)   # (0.8 + 0) / 2


# --- MME ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("Not really", "no"), ("Nope", "no"),
    ("I think yes", "other"), (" yes", "yes"), ("maybe", "other"),
])
def test_mme_parse(text, expected):
    assert mme_parse(text) == expected


def test_mme_acc_plus_one_of_two_images():
    recs = [dict(subtask="count", image="1.jpg", answer="Yes", prediction="Yes"),
            dict(subtask="count", image="1.jpg", answer="No", prediction="No"),
            dict(subtask="count", image="2.jpg", answer="Yes", prediction="Yes"),
            dict(subtask="count", image="2.jpg", answer="No", prediction="Yes")]
    # acc = 3/4 -> 75; acc+ = 1 image of 2 -> 50; score 125
    s = mme_scores(recs)
    assert s["count"] == pytest.approx(125.0)
    assert s["perception"] == pytest.approx(125.0) and s["cognition"] == 0.0


def test_mme_other_is_wrong_and_totals():
    recs = [dict(subtask="OCR", image="o.jpg", answer="Yes", prediction="I cannot tell"),   # other -> wrong
            dict(subtask="OCR", image="o.jpg", answer="No", prediction="no"),
            dict(subtask="text_translation", image="t.png", answer="Yes", prediction="yes"),
            dict(subtask="text_translation", image="t.png", answer="No", prediction="No."),
            dict(subtask="code_reasoning", image="c.png", answer="Yes", prediction="no"),
            dict(subtask="code_reasoning", image="c.png", answer="No", prediction="yes")]
    s = mme_scores(recs)
    assert s["OCR"] == pytest.approx(50.0)                  # acc 1/2 -> 50, acc+ 0 -> 0
    assert s["text_translation"] == pytest.approx(200.0)    # 100 + 100
    assert s["code_reasoning"] == 0.0
    assert s["perception"] == pytest.approx(50.0)
    assert s["cognition"] == pytest.approx(200.0)           # 200 + 0


def test_mme_subtask_names():
    assert sorted(MME_PERCEPTION + MME_COGNITION) == sorted([
        "OCR", "artwork", "celebrity", "code_reasoning", "color", "commonsense_reasoning", "count", "existence",
        "landmark", "numerical_calculation", "position", "posters", "scene", "text_translation"])
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4


# --- GQA, ScienceQA ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, answer, expected", [
    ("Yes.", "yes", True), ("yes..", "yes", True), ("Left", "left", True), ("Yes!", "yes", False),
    (" yes", "yes", False), ("the left", "left", False),
])
def test_gqa_match(pred, answer, expected):
    assert gqa_match(pred, answer) is expected


@pytest.mark.parametrize("text, n, expected", [
    ("B", 3, "B"), ("B. a cat", 3, "B"), ("Because of gravity. The answer is A.", 2, "A"),
    ("The answer is C.", 2, None),            # letter beyond the options
    ("b", 3, None), ("B.", 3, None), ("(A)", 4, None),
    ("The answer is A. The answer is B.", 2, None),   # two matches: failure
    ("E", 5, "E"), ("E", 4, None),
])
def test_scienceqa_letter(text, n, expected):
    assert scienceqa_letter(text, n) == expected


def test_pope_answer_splits_on_single_spaces_only():
    # eval_pope.py splits the first sentence on " ": "No\n" is the one word "No\n", not "No", so a yes;
    # "  no" is the words "", "", "no", so a no
    assert pope_answer("No\n") == "yes"
    assert pope_answer("  no") == "no"
