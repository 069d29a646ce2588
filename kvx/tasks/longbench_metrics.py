"""LongBench's official metrics, one per subtask, computed as THUDM/LongBench's metrics.py and eval.py compute them.

Each metric scores one prediction against one ground truth; `score_example` takes the best over the ground truths
(after LongBench's first-line rule for trec, triviaqa, samsum and lsht) and `subtask_score` averages over examples
and reports 100 x the mean rounded to two decimals. LongBench-E (`*_e` subtasks) also splits by input length in
words: 0-4k, 4-8k, 8k+.

ROUGE-L is LongBench's `rouge.Rouge().get_scores(...)["rouge-l"]["f"]` (the `rouge` package, version 1.0.1):
summary-level union-LCS ROUGE-L over sentences split at ".", with words counted as sets, and 0 for an empty
prediction. One deliberate difference: the reference implementation recurses once per LCS step and so scores 0
(a caught RecursionError) when a sentence pair is longer than about a thousand words; here the LCS is iterative.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def _jieba_cut(text: str) -> list[str]:
    import logging

    import jieba

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


# normalisation ----------------------------------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, the articles a/an/the and extra whitespace (SQuAD style)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop Chinese and ASCII punctuation and all whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _ZH_PUNCT)
    return "".join(s.split())


# token F1 ---------------------------------------------------------------------------------------------------------
def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(ground_truth)) if t]
    return f1_tokens(pred, gold)


# ROUGE-L (summary level, as the `rouge` package computes it) ---------------------------------------------------------
def _sentences(text: str) -> list[str]:
    return [" ".join(part.split()) for part in text.split(".") if len(part) > 0]


def _words(sentences: Sequence[str]) -> list[str]:
    return [w for s in sentences for w in s.split(" ")]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one longest common subsequence of x and y, with the reference's tie-breaking."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l_f(prediction: str, reference: str) -> float:
    """F of summary-level ROUGE-L; 0 when either side has no sentence (the reference's caught ValueError)."""
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    m = len(set(_words(ref)))
    n = len(set(_words(hyp)))
    union: set[str] = set()
    hits = 0
    for ref_s in ref:
        ref_words = ref_s.split(" ")
        before = len(union)
        for hyp_s in hyp:
            union |= _lcs_words(ref_words, hyp_s.split(" "))
        hits += len(union) - before
    r, p = hits / m, hits / n
    return 2.0 * (p * r) / (p + r + 1e-8)


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_l_f(prediction, ground_truth)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return rouge_l_f(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(ground_truth)))


# classification, retrieval, counting, code ------------------------------------------------------------------------
def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1 / (number of matched class names) if the ground truth is among them.

    As in the reference: class names found in the prediction, less those that are a strict substring of the ground
    truth (removed while iterating over the same list, so a match right after a removed one survives); its
    fallback to the most similar class name is unreachable (`em_match_list != 0` is always true) and so absent."""
    all_classes = kwargs["all_classes"] or []
    matches = [c for c in all_classes if c in prediction]
    i = 0  # a for-loop over `matches` while removing from it: the index advances past the shifted element
    while i < len(matches):
        term = matches[i]
        if term in ground_truth and term != ground_truth:
            matches.remove(term)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _digit_match_score(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for x in numbers if x == str(target)) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _digit_match_score(prediction, found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    found = re.findall(r"段落(\d+)", ground_truth)
    return _digit_match_score(prediction, found[0])


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    return _digit_match_score(prediction, str(ground_truth))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzzywuzzy ratio / 100 between the ground truth and the first prediction line with no `, # or //."""
    import warnings

    with warnings.catch_warnings():  # without python-Levenshtein, fuzzywuzzy warns and uses difflib
        warnings.simplefilter("ignore", UserWarning)
        from fuzzywuzzy import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, ground_truth) / 100


# per subtask ------------------------------------------------------------------------------------------------------
DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "multifieldqa_zh": qa_f1_zh_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "dureader": rouge_zh_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "vcsum": rouge_zh_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "lsht": classification_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}
FIRST_LINE_DATASETS = ("trec", "triviaqa", "samsum", "lsht")
E_BUCKETS = ("0-4k", "4-8k", "8k+")


def base_name(subtask: str) -> str:
    """`qasper_e` -> `qasper` (the LongBench-E variant shares its base's prompt, length and metric)."""
    return subtask[:-2] if subtask.endswith("_e") else subtask


def score_example(dataset: str, prediction: str, answers: Sequence[str], all_classes) -> float:
    """The best score of one prediction over its ground truths (LongBench's `scorer` inner loop)."""
    dataset = base_name(dataset)
    metric = DATASET2METRIC[dataset]
    if dataset in FIRST_LINE_DATASETS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for gt in answers:
        best = max(best, metric(prediction, gt, all_classes=all_classes))
    return best


def subtask_score(scores: Sequence[float]) -> float:
    """100 x mean, rounded to two decimals (LongBench's `scorer`)."""
    return round(100 * sum(scores) / len(scores), 2)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def subtask_score_e(scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float]:
    """LongBench-E: 100 x mean per length bucket, rounded; empty buckets are left out."""
    buckets: dict[str, list[float]] = {b: [] for b in E_BUCKETS}
    for s, n in zip(scores, lengths):
        buckets[length_bucket(int(n))].append(s)
    return {b: round(100 * sum(v) / len(v), 2) for b, v in buckets.items() if v}
