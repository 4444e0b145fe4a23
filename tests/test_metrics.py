import math

import pytest

from sdpo.evaluation import score_generations, score_rankings
from sdpo.metrics import longest_match, paper_match, rank_of, ranking_metrics
from sdpo.records import Record

CANDIDATES = ["Beck", "Jeff Beck", "Crosby, Stills, Nash & Young", "Stills", "Adele"]


def test_ranking_metrics_by_hand():
    metrics = ranking_metrics([1, 3, 7, 20])
    assert metrics["hr@1"] == 0.25 and metrics["hr@5"] == 0.5
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 20) / 4)
    assert metrics["valid_ratio"] == 1.0
    assert rank_of("b", ["a", "b"]) == 2


@pytest.mark.parametrize(
    "text, target, paper_valid, paper_hit, strict_valid, strict_hit",
    [
        ("Jeff Beck", "Jeff Beck", False, False, True, True),  # the substring clash: paper counts Beck too
        ("Beck", "Beck", True, True, True, True),
        ("Beck", "Jeff Beck", True, False, True, False),
        ("Beck and Jeff Beck", "Beck", False, False, False, False),  # really two names
        ("Crosby, Stills, Nash & Young", "Crosby, Stills, Nash & Young", False, False, True, True),  # comma name
        ("", "Adele", False, False, False, False),  # empty generation
        ("I think you will love music from many artists, e.g. Adele. Adele is great", "Adele", True, True, True, True),
        ("Sure! Here are some ideas: Adele, Beck, and more", "Adele", False, False, False, False),  # rambling
        ("adele", "Adele", False, False, False, False),  # case matters, as in the paper
    ],
)
def test_matchers(text, target, paper_valid, paper_hit, strict_valid, strict_hit):
    paper, strict = paper_match(text, CANDIDATES, target), longest_match(text, CANDIDATES, target)
    assert (paper.valid, paper.hit) == (paper_valid, paper_hit)
    assert (strict.valid, strict.hit) == (strict_valid, strict_hit)


def test_score_generations_counts():
    records = [Record(f"r{i}", None, ["Zed"], CANDIDATES, t) for i, t in enumerate(["Jeff Beck", "Adele", "Beck"])]
    result = score_generations(records, ["Jeff Beck", "Adele", "nothing"])
    assert result.metrics == {"hr@1": 1 / 3, "valid_ratio": 1 / 3, "strict_hr@1": 2 / 3, "strict_valid_ratio": 2 / 3}
    assert result.predictions[0] == {
        "id": "r0", "target": "Jeff Beck", "generated": "Jeff Beck", "matched": ["Beck", "Jeff Beck"],
        "hit": False, "valid": False, "strict_hit": True, "strict_valid": True,
    }


def test_score_rankings():
    records = [Record("r0", None, ["Zed"], ["a", "b", "c"], "b"), Record("r1", None, ["Zed"], ["a", "b", "c"], "a")]
    rankings = [[("b", -1.0), ("a", -2.0), ("c", -3.0)], [("c", -0.5), ("b", -0.7), ("a", -0.9)]]
    result = score_rankings(records, rankings)
    assert result.metrics["hr@1"] == 0.5 and result.metrics["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert result.predictions[1]["rank"] == 3 and result.predictions[0]["hit"] is True
    assert result.predictions[0]["ranking"][0] == {"title": "b", "score": -1.0}
