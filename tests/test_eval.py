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


# --- benchmark readers: tiny folders in each benchmark's released format -----------------------------------------

import json

from visualrwkv.eval import (BENCHMARKS, LAYOUTS, BenchQuestion, markdown_table, missing_images, mmbench_match,
                             mmbench_submission, read_benchmark, read_gqa, read_mme, read_mmbench, read_mmbench_cn,
                             read_pope, read_scienceqa, read_textvqa, read_vizwiz, read_vqav2, read_vqav2_val,
                             rotate_options, score_benchmark, score_mmbench, set_imageless, textvqa_accuracy,
                             vizwiz_submission, vqav2_submission, write_mmbench_submission, write_vizwiz_submission,
                             write_vqav2_submission)

HINT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def test_bench_question_conversation_and_zero_image_switch():
    with_picture = BenchQuestion(1, "<image>\nWhat is it?", image="a.jpg")
    text_only = BenchQuestion(2, "Which word is a noun?")
    assert with_picture.conversations() == [{"from": "human", "value": "<image>\nWhat is it?"},
                                            {"from": "gpt", "value": ""}]
    # the official run gives a question without a picture a zero image (evaluate.py get_input_image_tensor)
    assert (with_picture.zero_image, text_only.zero_image) == (False, True)
    set_imageless([with_picture, text_only], "text")
    assert (with_picture.zero_image, text_only.zero_image) == (False, False)
    set_imageless([with_picture, text_only], "zeros")
    assert text_only.zero_image is True
    with pytest.raises(ValueError, match="imageless must be one of"):
        set_imageless([text_only], "blank")


def test_vqav2_and_vizwiz_prompts(tmp_path):
    # evaluate.py line 101: "<image>\n" + the line's text, nothing else added
    write_jsonl(tmp_path / "eval/vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", [
        {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg",
         "text": f"Is the ball flying towards the batter?\n{HINT}", "category": "default"}])
    unanswerable = "When the provided information is insufficient, respond with 'Unanswerable'."
    write_jsonl(tmp_path / "eval/vizwiz/llava_test.jsonl", [
        {"question_id": 0, "image": "VizWiz_test_00000000.jpg", "text": f"What is this?\n{unanswerable}\n{HINT}"}])
    (q,) = read_benchmark("vqav2", tmp_path)
    assert (q.id, q.image) == (262144000, "COCO_test2015_000000262144.jpg")
    assert q.text == ("<image>\nIs the ball flying towards the batter?\n"
                      "Answer the question using a single word or phrase.")
    (v,) = read_vizwiz(tmp_path / "eval/vizwiz")
    assert v.text == ("<image>\nWhat is this?\nWhen the provided information is insufficient, respond with "
                      "'Unanswerable'.\nAnswer the question using a single word or phrase.")
    assert read_vqav2(tmp_path / "eval/vqav2")[0].zero_image is False


def test_vqav2_val_scored_locally(tmp_path):
    folder = tmp_path / "eval/vqav2"
    write_jsonl(folder / "visualrwkv_vqav2_mscoco_val2014.jsonl", [
        {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": f"What color is the bus?\n{HINT}"},
        {"question_id": 2, "image": "COCO_val2014_000000000042.jpg", "text": f"Is it raining?\n{HINT}"}])
    answers = lambda words: [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]
    write_json(folder / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 1, "image_id": 42, "answers": answers(["red"] * 2 + ["blue"] * 8), "answer_type": "other",
         "question_type": "what color"},
        {"question_id": 2, "image_id": 42, "answers": answers(["yes"] * 10), "answer_type": "yes/no",
         "question_type": "is it"}]})
    questions = read_vqav2_val(folder)
    assert questions[0].meta == {"answers": ["red"] * 2 + ["blue"] * 8, "answer_type": "other"}
    s = score_benchmark("vqav2_val", questions, {1: "Red.", 2: "no"})
    # "Red." -> "red": 2 of 10 humans -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "no" -> 0. Mean (0.6 + 0) / 2 = 30%
    assert s["headline"]["accuracy"] == pytest.approx(30.0)
    assert s["details"]["per_answer_type"] == pytest.approx({"other": 60.0, "yes/no": 0.0})


def test_gqa_reader_and_score(tmp_path):
    folder = tmp_path / "eval/gqa"
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "20968379", "image": "n288870.jpg", "text": f"Do the shorts have dark color?\n{HINT}",
         "category": "default"},
        {"question_id": "20968380", "image": "n288870.jpg", "text": f"What is the man sitting on?\n{HINT}",
         "category": "default"}])
    write_json(folder / "testdev_balanced_questions.json", {
        "20968379": {"question": "Do the shorts have dark color?", "answer": "yes", "isBalanced": True},
        # the official eval_gqa.py reads an `answers` list (GPT-reviewed answers) when the file has one
        "20968380": {"question": "What is the man sitting on?", "answers": ["sofa", "couch"], "isBalanced": True}})
    questions = read_gqa(folder)
    assert questions[0].text == "<image>\nDo the shorts have dark color?\nAnswer the question using a single word or phrase."
    assert [q.meta["answers"] for q in questions] == [["yes"], ["sofa", "couch"]]
    # "Yes." -> "yes" right; "Couch." -> "couch", in the list: right -> 100%; "no" then "chair": 0%
    assert score_benchmark("gqa", questions, {"20968379": "Yes.", "20968380": "Couch."})["headline"] == {"accuracy": 100.0}
    assert score_benchmark("gqa", questions, {"20968379": "no", "20968380": "chair"})["headline"] == {"accuracy": 0.0}


def write_textvqa(folder):
    write_json(folder / "TextVQA_0.5.1_val.json", {"data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "question": "what is the brand of this camera?",
         "answers": ["dakota"] * 5 + ["Dakota Digital"] * 2 + ["dakota digital camera"] * 2 + ["nous"]},
        {"question_id": 34603, "image_id": "003a8ae2ef43b901", "question": "what number is on the dial?",
         "answers": ["Three"] * 3 + ["3"] * 2 + ["33"] * 5},
        {"question_id": 34700, "image_id": "0054c91397f2fe05", "question": "what does the sign say?",
         "answers": ["STOP"] * 10}]})
    # LLaVA's question file: question_id is the image id, shared by the questions of one image
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg",
         "text": f"what is the brand of this camera?\nReference OCR token: dakota, digital\n{HINT}"},
        {"question_id": "003a8ae2ef43b901", "image": "003a8ae2ef43b901.jpg", "text": f"what number is on the dial?\n{HINT}"},
        {"question_id": "0054c91397f2fe05", "image": "0054c91397f2fe05.jpg",
         "text": f"what does the sign say?\nReference OCR token: STOP\n{HINT}"}])


def test_textvqa_reader_and_score_match_official(tmp_path):
    folder = tmp_path / "eval/textvqa"
    write_textvqa(folder)
    questions = read_textvqa(folder)
    assert [q.id for q in questions] == [34602, 34603, 34700]       # the annotations' own ids, unique
    assert questions[0].text == ("<image>\nwhat is the brand of this camera?\nReference OCR token: dakota, digital\n"
                                 "Answer the question using a single word or phrase.")
    s = score_benchmark("textvqa", questions, {34602: "Dakota Digital.", 34603: "3", 34700: "yield"})
    # the official eval/eval_textvqa.py on this fixture (prompts "User: <image>\n...\n\nAssistant:") printed
    # "Accuracy: 53.33%": per question 0.6, 1.0, 0.0 (TextVQAAccuracyEvaluator)
    assert s["headline"]["accuracy"] == pytest.approx(160 / 3)


@pytest.mark.parametrize("prediction, answers, expected", [
    # 2 of 10 match: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    ("Dakota Digital.", ["dakota"] * 5 + ["Dakota Digital"] * 2 + ["dakota digital camera"] * 2 + ["nous"], 0.6),
    # the humans' "Three" is normalised to "3" too: 5 match -> every nine holds >= 4 -> 1.0 (VQAv2's rule: 0.6)
    ("3", ["Three"] * 3 + ["3"] * 2 + ["33"] * 5, 1.0),
    # 3 of 10 after normalisation ("The Stop" -> "stop"): (3 * 2/3 + 7 * 1) / 10 = 0.9
    ("stop", ["Stop", "STOP.", "The Stop"] + ["red"] * 7, 0.9),
    ("yield", ["STOP"] * 10, 0.0),
])
def test_textvqa_accuracy(prediction, answers, expected):
    assert textvqa_accuracy(prediction, answers) == pytest.approx(expected)


def write_pope(folder, random_label_image="COCO_val2014_000000000003.jpg"):
    write_jsonl(folder / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a dog in the image?\n{HINT}",
         "category": "adversarial"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a car in the image?\n{HINT}",
         "category": "adversarial"},
        {"question_id": 3, "image": "COCO_val2014_000000000003.jpg", "text": f"Is there a cat in the image?\n{HINT}",
         "category": "random"},
        {"question_id": 4, "image": "COCO_val2014_000000000003.jpg", "text": f"Is there a kite in the image?\n{HINT}",
         "category": "random"}])
    write_jsonl(folder / "coco/coco_pope_adversarial.json", [
        {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a car in the image?", "label": "no"}])
    write_jsonl(folder / "coco/coco_pope_popular.json", [])
    write_jsonl(folder / "coco/coco_pope_random.json", [
        {"question_id": 1, "image": random_label_image, "text": "Is there a cat in the image?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000000003.jpg", "text": "Is there a kite in the image?", "label": "no"}])


def test_pope_reader_and_missing_answer_is_wrong(tmp_path):
    folder = tmp_path / "eval/pope"
    write_pope(folder)
    questions = read_pope(folder)
    assert [(q.meta["category"], q.meta["label"]) for q in questions] == [
        ("adversarial", "yes"), ("adversarial", "no"), ("random", "yes"), ("random", "no")]
    assert questions[0].text == "<image>\nIs there a dog in the image?\nAnswer the question using a single word or phrase."
    s = score_benchmark("pope", questions, {1: "Yes", 2: "No", 3: "No, there is not."}, max_missing=0.25)
    # adversarial: TP 1, TN 1 -> F1 1. random: q3 "No" on a yes -> FN; q4 has no answer, so it gets the wrong verdict,
    # "yes" on a no -> FP: precision 0/1, recall 0/1 -> F1 0. Mean over the two splits present: 50%
    assert s["headline"] == pytest.approx({"f1_adversarial": 100.0, "f1_random": 0.0, "f1_mean": 50.0})
    assert s["missing"] == [4]


def test_pope_refuses_labels_that_do_not_line_up(tmp_path):
    folder = tmp_path / "eval/pope"
    write_pope(folder, random_label_image="COCO_val2014_000000000999.jpg")
    with pytest.raises(ValueError, match=r"llava_pope_test.jsonl:3: no entry for .*coco_pope_<split>.json"):
        read_pope(folder)


def write_mme(folder):
    release = folder / "MME_Benchmark_release_version"
    (release / "count").mkdir(parents=True)
    # flat layout: picture and .txt side by side; the second question has two spaces before MME's request
    (release / "count/000000450303.txt").write_text(
        "Are there two people in the image? Please answer yes or no.\tYes\n"
        "Are there three people in the image?  Please answer yes or no.\tNo\n")
    (release / "artwork/questions_answers_YN").mkdir(parents=True)
    (release / "artwork/images").mkdir()
    (release / "artwork/questions_answers_YN/10002.txt").write_text(
        "Does this artwork exist in the form of painting? Please answer yes or no.\tYes\n"
        "Does this artwork exist in the form of glassware? Please answer yes or no.\tNo\n")
    write_jsonl(folder / "llava_mme.jsonl", [
        {"question_id": "count/000000450303.jpg", "image": "count/000000450303.jpg",
         "text": f"Are there two people in the image?\n{HINT}", "category": "count"},
        {"question_id": "count/000000450303.jpg", "image": "count/000000450303.jpg",
         "text": f"Are there three people in the image?\n{HINT}", "category": "count"},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": f"Does this artwork exist in the form of painting?\n{HINT}", "category": "artwork"},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": f"Does this artwork exist in the form of glassware?\n{HINT}", "category": "artwork"}])


def test_mme_reader_both_layouts_and_score(tmp_path):
    folder = tmp_path / "eval/MME"
    write_mme(folder)
    questions = read_benchmark("mme", tmp_path)
    assert [q.id for q in questions] == ["count/000000450303.jpg", "count/000000450303.jpg#2",
                                         "artwork/10002.jpg", "artwork/10002.jpg#2"]
    assert [q.meta["answer"] for q in questions] == ["Yes", "No", "Yes", "No"]
    assert questions[2].image == "artwork/images/10002.jpg"
    assert questions[0].text == "<image>\nAre there two people in the image?\nAnswer the question using a single word or phrase."
    answers = {"count/000000450303.jpg": "Yes", "count/000000450303.jpg#2": "No",
               "artwork/10002.jpg": "Yes", "artwork/10002.jpg#2": "Yes"}
    s = score_benchmark("mme", questions, answers)
    # count: 2/2 -> 100 + image right -> 100 = 200; artwork: 1/2 -> 50 + 0 = 50; perception 250
    assert s["headline"] == pytest.approx({"perception": 250.0, "cognition": 0.0})
    assert s["details"]["count"] == pytest.approx(200.0) and s["details"]["artwork"] == pytest.approx(50.0)


def write_scienceqa(folder, human_12="Context: N/A\nQuestion: Which animal has fur?\nOptions: (A) frog (B) fox\n<image>"):
    write_json(folder / "llava_test_CQM-A.json", [
        {"id": "12", "image": "12/image.png", "conversations": [
            {"from": "human", "value": human_12}, {"from": "gpt", "value": "The answer is B."}]},
        {"id": "13", "image": "13/image.png", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which is a liquid?\nOptions: (A) milk (B) rock (C) air\n<image>"},
            {"from": "gpt", "value": "The answer is A."}]},
        {"id": "14", "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which word is a noun?\nOptions: (A) cat (B) run"},
            {"from": "gpt", "value": "The answer is A."}]}])
    write_json(folder / "problems.json", {
        "12": {"question": "Which animal has fur?", "choices": ["frog", "fox"], "answer": 1, "hint": "", "image": "image.png"},
        "13": {"question": "Which is a liquid?", "choices": ["milk", "rock", "air"], "answer": 0, "hint": "", "image": "image.png"},
        "14": {"question": "Which word is a noun?", "choices": ["cat", "run"], "answer": 0, "hint": "", "image": None}})


def test_scienceqa_prompts_img_subset_and_score(tmp_path):
    folder = tmp_path / "eval/scienceqa"
    write_scienceqa(folder)
    img = read_scienceqa(folder)
    assert [q.id for q in img] == ["12", "13"]                              # IMG subset by default
    assert img[0].text == ("<image>\nContext: N/A\nQuestion: Which animal has fur?\nOptions: (A) frog (B) fox\n"
                           "Answer with the option's letter from the given choices directly.")
    assert img[0].meta == {"answer": "B", "n_options": 2}
    bare = read_scienceqa(folder, img_only=False, letter_instruction=False)
    assert bare[0].text == "<image>\nContext: N/A\nQuestion: Which animal has fur?\nOptions: (A) frog (B) fox"
    assert bare[2].text == "Context: N/A\nQuestion: Which word is a noun?\nOptions: (A) cat (B) run"
    assert (bare[2].image, bare[2].zero_image) == (None, True)
    assert read_benchmark("scienceqa", tmp_path, imageless="text", img_only=False)[2].zero_image is False
    s = score_benchmark("scienceqa", bare, {"12": "B", "13": "The answer is C.", "14": "A"})
    # the official eval/eval_science_qa.py on this fixture printed "Accuracy: 66.67%, IMG-Accuracy: 50.00%"
    assert s["details"]["accuracy"] == pytest.approx(200 / 3)
    assert s["headline"] == pytest.approx({"img_accuracy": 50.0})


def test_scienceqa_instruction_not_doubled(tmp_path):
    folder = tmp_path / "eval/scienceqa"
    write_scienceqa(folder, human_12=f"<image>\nContext: N/A\nQuestion: Which animal has fur?\nOptions: (A) frog (B) fox\n{LETTER}")
    assert read_scienceqa(folder)[0].text.count(LETTER) == 1


# --- MMBench -----------------------------------------------------------------------------------------------------

MMBENCH_HEADER = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"


def write_mmbench_tsv(folder, rows, name="mmbench_dev_20230712.tsv"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join([MMBENCH_HEADER, *rows]) + "\n", encoding="utf-8")
    return folder


TSV_ROWS = [
    # four options, no hint
    "3\tWhat is the main object?\t\tteddy bear\trabbit\tcat\tdog\tC\tobject_localization\taGk=\tx\tperception\t\tdev",
    # two options (C and D empty), with a hint
    "5\tIs it day or night?\tLook at the sky.\tday\tnight\t\t\tA\tscene\taGk=\ty\tperception\t\tdev",
]


def test_mmbench_prompt(tmp_path):
    folder = write_mmbench_tsv(tmp_path / "eval/mmbench", TSV_ROWS)
    questions = read_mmbench(folder, circular=False)
    # evaluate.py get_input_text_mmbench: <image>, hint, question, "X. option" lines, instruction, joined by "\n"
    assert questions[0].text == ("<image>\nWhat is the main object?\nA. teddy bear\nB. rabbit\nC. cat\nD. dog\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert questions[1].text == ("<image>\nLook at the sky.\nIs it day or night?\nA. day\nB. night\n"
                                 "Answer with the option's letter from the given choices directly.")
    assert (questions[0].image, questions[0].image_base64, questions[0].zero_image) == (None, "aGk=", False)


def test_mmbench_cn_prompt(tmp_path):
    rows = ["7\t图中主要的物体是什么？\t请仔细看图。\t泰迪熊\t兔子\t\t\tB\tobject_localization\taGk=\tx\tperception\t\tdev"]
    folder = write_mmbench_tsv(tmp_path / "eval/mmbench", rows, name="mmbench_dev_cn_20231003.tsv")
    (q,) = read_mmbench_cn(folder, circular=False)
    assert q.text == "<image>\n请仔细看图。\n图中主要的物体是什么？\nA. 泰迪熊\nB. 兔子\n请直接回答选项字母。"


def test_mmbench_rotations_four_and_two_options(tmp_path):
    questions = read_mmbench(write_mmbench_tsv(tmp_path / "eval/mmbench", TSV_ROWS))
    assert [q.id for q in questions] == [3, 1_000_003, 2_000_003, 3_000_003, 5, 1_000_005]
    # 4 options, answer C (cat): rotation k puts option k first; cat moves C -> B -> A -> D
    assert [q.meta["answer"] for q in questions[:4]] == ["C", "B", "A", "D"]
    assert questions[1].meta["options"] == {"A": "rabbit", "B": "cat", "C": "dog", "D": "teddy bear"}
    assert questions[1].text.endswith("A. rabbit\nB. cat\nC. dog\nD. teddy bear\n" + LETTER)
    assert [q.meta["answer"] for q in questions[4:]] == ["A", "B"]
    assert {q.meta["group"] for q in questions} == {3, 5}


def test_mmbench_rotations_three_options(tmp_path):
    rows = ["9\tWhich is a fruit?\t\tapple\tstone\tshoe\t\tA\tattribute_recognition\taGk=\tx\tperception\t\tdev"]
    questions = read_mmbench(write_mmbench_tsv(tmp_path / "eval/mmbench", rows))
    # three options -> three rotations; "apple" moves A -> C -> B
    assert [(q.id, q.meta["answer"]) for q in questions] == [(9, "A"), (1_000_009, "C"), (2_000_009, "B")]
    assert questions[2].text == ("<image>\nWhich is a fruit?\nA. shoe\nB. apple\nC. stone\n"
                                 "Answer with the option's letter from the given choices directly.")


def test_rotate_options_three():
    options = {"A": "x", "B": "y", "C": "z"}
    assert rotate_options(options, "A", 0) == (options, "A")
    assert rotate_options(options, "A", 1) == ({"A": "y", "B": "z", "C": "x"}, "C")
    assert rotate_options(options, "A", 2) == ({"A": "z", "B": "x", "C": "y"}, "B")


def test_mmbench_file_with_rotated_copies_is_read_as_is(tmp_path):
    rows = [TSV_ROWS[1], "1000005\tIs it day or night?\tLook at the sky.\tnight\tday\t\t\tB\tscene\taGk=\ty\tperception\t\tdev"]
    folder = write_mmbench_tsv(tmp_path / "eval/mmbench", rows)
    assert [(q.id, q.meta["answer"], q.meta["group"]) for q in read_mmbench(folder)] == [(5, "A", 5), (1_000_005, "B", 5)]
    assert [q.id for q in read_mmbench(folder, circular=False)] == [5]


def test_mmbench_circular_one_rotation_wrong(tmp_path):
    questions = read_mmbench(write_mmbench_tsv(tmp_path / "eval/mmbench", TSV_ROWS))
    right = {3: "C", 1_000_003: "B", 2_000_003: "A", 3_000_003: "D", 5: "A", 1_000_005: "B"}
    assert score_mmbench(questions, right)["accuracy"] == 100.0
    one_wrong = {**right, 2_000_003: "B"}
    s = score_mmbench(questions, one_wrong)
    assert s["accuracy"] == 50.0 and s["unmatched"] == 0     # question 3 wrong, question 5 right
    assert s["per_category"] == {"object_localization": 0.0, "scene": 100.0}
    assert s["per_l2_category"] == {"perception": 50.0}


def test_mmbench_unmatched_counted_and_listed(tmp_path):
    questions = read_mmbench(write_mmbench_tsv(tmp_path / "eval/mmbench", TSV_ROWS))
    answers = {3: "C", 1_000_003: "cat", 2_000_003: "I am not sure", 3_000_003: "D", 5: "It is day.", 1_000_005: "E"}
    s = score_mmbench(questions, answers)
    assert s["unmatched"] == 2 and s["unmatched_ids"] == [2_000_003, 1_000_005]
    assert s["accuracy"] == 0.0


OPTIONS = {"A": "teddy bear", "B": "rabbit", "C": "cat"}


@pytest.mark.parametrize("prediction, expected", [
    ("C", "C"), ("C.", "C"), ("(C)", "C"), ("C) cat", "C"), ("C, the cat", "C"), ("  C  ", "C"),
    ("The answer is C.", "C"), ("The answer is (C)", "C"), ("Answer: C", "C"),
    ("D", None),                       # a letter that is not an option
    ("A cat.", "C"),                   # "A" before a word is the article: read by text, the one option it contains
    ("cat", "C"), ("Cat.", "C"), ("It is a rabbit", "B"),
    ("a teddy bear or a rabbit", None),  # two options contained
    ("a dog", None), ("", None),
])
def test_mmbench_match(prediction, expected):
    assert mmbench_match(prediction, OPTIONS) == expected


def test_mmbench_match_prefers_equal_text():
    # "red car" contains both options' text; it equals one of them
    assert mmbench_match("Red car", {"A": "red", "B": "red car"}) == "B"


# --- upload files: expected values from the official converters run on the same fixture ---------------------------

def test_vqav2_submission_matches_official(tmp_path):
    folder = tmp_path / "eval/vqav2"
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", [
        {"question_id": 262144000, "image": "COCO_test2015_000000262144.jpg", "text": f"Is the ball flying towards the batter?\n{HINT}"},
        {"question_id": 262144001, "image": "COCO_test2015_000000262144.jpg", "text": f"How many people are there?\n{HINT}"},
        {"question_id": 262144002, "image": "COCO_test2015_000000262144.jpg", "text": f"What is the man holding?\n{HINT}"}])
    dst = tmp_path / "upload/vqav2.json"
    write_vqav2_submission(folder, {262144000: "Yes.", 262144002: "A Baseball-Bat"}, dst)
    # output of eval/convert_vqav2_for_submission.py on this fixture (answers in merge.jsonl, 262144001 unanswered)
    assert dst.read_text() == ('[{"question_id": 262144000, "answer": "yes"}, {"question_id": 262144001, "answer": ""}, '
                               '{"question_id": 262144002, "answer": "baseball bat"}]')
    assert vqav2_submission([9], {}) == [{"question_id": 9, "answer": ""}]
    with pytest.raises(FileNotFoundError, match="llava_vqav2_mscoco_test2015.jsonl"):
        write_vqav2_submission(tmp_path, {}, dst)


def test_vizwiz_submission_matches_official(tmp_path):
    questions = [BenchQuestion(0, "<image>\nWhat is this?", "VizWiz_test_00000000.jpg"),
                 BenchQuestion(1, "<image>\nWhat color is this shirt?", "VizWiz_test_00000001.jpg")]
    dst = tmp_path / "vizwiz.json"
    write_vizwiz_submission(questions, {1: "Light Blue, with two stripes.", 0: "Unanswerable"}, dst)
    # output of eval/convert_vizwiz_for_submission.py on this fixture. By hand: "Light Blue, with two stripes." ->
    # lower, comma dropped -> full stop dropped -> "two" -> "2"
    assert dst.read_text() == ('[{"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"}, '
                               '{"image": "VizWiz_test_00000001.jpg", "answer": "light blue with 2 stripes"}]')
    with pytest.raises(ValueError, match=r"vizwiz: 1 questions have no answer \(first: \[1\]\)"):
        vizwiz_submission(questions, {0: "Unanswerable"})


MMBENCH_UPLOAD_ROWS = [  # "3" with D empty, "5" with C and D empty, as in the fixture of the official run
    "3\tWhat is the main object?\t\tteddy bear\trabbit\tcat\t\tC\tobject_localization\taGk=\tx\tfinegrained_perception\t\tdev",
    "5\tIs it day or night?\tLook at the sky.\tday\tnight\t\t\tA\tscene\taGk=\ty\tcoarse_perception\t\tdev",
]


def test_mmbench_submission_matches_official(tmp_path):
    folder = write_mmbench_tsv(tmp_path / "eval/mmbench", MMBENCH_UPLOAD_ROWS)
    table = mmbench_submission(folder / "mmbench_dev_20230712.tsv", {5: "A."})
    # eval/convert_mmbench_for_submission.py on this fixture (merge.jsonl answering 5 with "A."), read back with
    # pandas.read_excel: these columns and these cells (empty cells as NaN, a missing prediction empty)
    assert list(table.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    assert rows == [
        {"index": 3, "question": "What is the main object?", "A": "teddy bear", "B": "rabbit", "C": "cat", "D": None,
         "prediction": None, "answer": "C", "split": "dev"},
        {"index": 5, "question": "Is it day or night?", "A": "day", "B": "night", "C": None, "D": None,
         "prediction": "A.", "answer": "A", "split": "dev"}]


def test_write_mmbench_submission_xlsx(tmp_path):
    pytest.importorskip("openpyxl")
    import pandas as pd
    folder = write_mmbench_tsv(tmp_path / "eval/mmbench", MMBENCH_UPLOAD_ROWS)
    write_mmbench_submission(folder, {5: "A."}, tmp_path / "up/exp.xlsx")
    back = pd.read_excel(tmp_path / "up/exp.xlsx")
    assert list(back.columns) == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert back["prediction"].isna().tolist() == [True, False] and back["prediction"][1] == "A."


# --- the entry point ---------------------------------------------------------------------------------------------

def gqa_folder(root, n):
    folder = root / "eval/gqa"
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl",
                [{"question_id": str(i), "image": "n1.jpg", "text": f"Is it red?\n{HINT}"} for i in range(n)])
    write_json(folder / "testdev_balanced_questions.json", {str(i): {"answer": "yes", "isBalanced": True} for i in range(n)})
    return read_benchmark("gqa", root)


def test_score_benchmark_counts_missing_as_wrong_and_names_them(tmp_path):
    questions = gqa_folder(tmp_path, 200)
    answers = {str(i): "yes" for i in range(200) if i not in (17, 42)}
    s = score_benchmark("gqa", questions, answers)          # 2 of 200 = 1%: allowed by max_missing=0.01
    assert s["missing"] == ["17", "42"] and s["questions"] == 200
    assert s["headline"]["accuracy"] == pytest.approx(99.0)  # 198 right of 200


def test_score_benchmark_refuses_above_max_missing(tmp_path):
    questions = gqa_folder(tmp_path, 200)
    answers = {str(i): "yes" for i in range(200) if i not in (3, 17, 42)}
    with pytest.raises(ValueError, match=r"gqa: 3 of 200 questions have no answer \(1\.5%, more than "
                                         r"max_missing=1\.0%\); first missing ids: \['3', '17', '42'\]"):
        score_benchmark("gqa", questions, answers)
    assert score_benchmark("gqa", questions, answers, max_missing=0.02)["missing"] == ["3", "17", "42"]


def test_score_benchmark_refusals():
    q = [BenchQuestion(1, "<image>\nq", "a.jpg")]
    with pytest.raises(ValueError, match="vqav2 has no public answers: write the upload file with write_vqav2_submission"):
        score_benchmark("vqav2", q, {1: "yes"})
    with pytest.raises(ValueError, match="vizwiz has no public answers: write the upload file with write_vizwiz_submission"):
        score_benchmark("vizwiz", q, {1: "yes"})
    with pytest.raises(ValueError, match="unknown benchmark 'vqa'"):
        score_benchmark("vqa", q, {1: "yes"})
    with pytest.raises(ValueError, match=r"question ids must be unique, repeated: \[1\]"):
        score_benchmark("gqa", q + q, {1: "yes"})
    with pytest.raises(ValueError, match="no questions"):
        score_benchmark("gqa", [], {})


def test_markdown_table(tmp_path):
    questions = gqa_folder(tmp_path, 4)
    s = score_benchmark("gqa", questions, {"0": "yes", "1": "no", "2": "Yes."}, max_missing=0.25)
    # 2 right of 4 -> 50.0; one missing
    assert markdown_table(s) == "| benchmark | accuracy | questions | missing |\n|---|---|---|---|\n| gqa | 50.0 | 4 | 1 |"


def test_benchmarks_table_covers_every_layout():
    assert set(BENCHMARKS) == set(LAYOUTS) == {"vqav2", "vqav2_val", "gqa", "scienceqa", "textvqa", "pope", "mme",
                                               "mmbench", "mmbench_cn", "vizwiz"}
    assert [n for n, b in BENCHMARKS.items() if b.scorer is None] == ["vqav2", "vizwiz"]


def test_missing_images(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    questions = [BenchQuestion(1, "<image>\nq", "a.jpg"), BenchQuestion(2, "<image>\nq", "b.jpg"), BenchQuestion(3, "q")]
    assert missing_images(questions, tmp_path) == [2]


# --- bad input: errors that name the problem ---------------------------------------------------------------------

def test_reader_names_missing_files_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gqa: missing .*llava_gqa_testdev_balanced\.jsonl, .*"
                                                r"testdev_balanced_questions\.json\. Expected <root>/eval/gqa/ holding"):
        read_benchmark("gqa", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/eval/eval_mme\.sh"):
        read_mme(tmp_path)


def test_reader_names_bad_lines(tmp_path):
    folder = tmp_path / "eval/vizwiz"
    folder.mkdir(parents=True)
    (folder / "llava_test.jsonl").write_text('{"question_id": 0, "image": "a.jpg", "text": "q"}\n{not json\n')
    with pytest.raises(ValueError, match=r"llava_test\.jsonl:2: not a JSON record"):
        read_vizwiz(folder)
    (folder / "llava_test.jsonl").write_text('{"question_id": 0, "image": "a.jpg", "question": "q"}\n')
    with pytest.raises(ValueError, match=r"llava_test\.jsonl:1: the record has no 'text'"):
        read_vizwiz(folder)


def test_mmbench_bad_tsv(tmp_path):
    folder = tmp_path / "eval/mmbench"
    folder.mkdir(parents=True)
    (folder / "mmbench_dev_20230712.tsv").write_text("index\tquestion\tA\tB\tanswer\n1\tq\tx\ty\tA\n")
    with pytest.raises(ValueError, match="no column hint, category, image"):
        read_mmbench(folder)
    write_mmbench_tsv(folder, ["3\tq\t\tx\ty\t\t\tC\tcat\taGk=\tx\tp\t\tdev"])
    with pytest.raises(ValueError, match=r"row 3: answer 'C' is not one of its options \['A', 'B'\]"):
        read_mmbench(folder)
    with pytest.raises(ValueError, match="lang must be one of"):
        read_mmbench(folder, lang="fr")
