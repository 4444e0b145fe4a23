import math

import pytest

from sdpo.data.records import Record
from sdpo.evaluation.generation import score_generations
from sdpo.evaluation.metrics import longest_match, paper_match, rank_of, ranked_indices, ranking_metrics, target_ranks, tie_order
from sdpo.evaluation.protocols import score_rankings

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
    intervals = result.metrics.pop("ci95")
    assert result.metrics == {"hr@1": 1 / 3, "valid_ratio": 1 / 3, "strict_hr@1": 2 / 3, "strict_valid_ratio": 2 / 3}
    assert set(intervals) == set(result.metrics) and all(lo <= result.metrics[k] <= hi for k, (lo, hi) in intervals.items())
    assert result.predictions[0] == {
        "id": "r0", "target": "Jeff Beck", "generated": "Jeff Beck", "matched": ["Beck", "Jeff Beck"],
        "hit": False, "valid": False, "strict_hit": True, "strict_valid": True,
    }


def test_score_rankings():
    records = [Record("r0", None, ["Zed"], ["a", "b", "c"], "b"), Record("r1", None, ["Zed"], ["a", "b", "c"], "a")]
    logps = [[-2.0, -1.0, -3.0], [-0.9, -0.7, -0.5]]
    result = score_rankings(records, logps)
    assert result.metrics["hr@1"] == 0.5 and result.metrics["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert result.predictions[1]["rank"] == 3 and result.predictions[0]["hit"] is True
    assert result.predictions[0]["ranking"][0] == {"title": "b", "logp": -1.0}
    assert "reward_hr@1" not in result.metrics and "logp_rank" not in result.predictions[0]


def test_score_rankings_by_reward():
    """reward = logp - reference: the reference's prior over titles cancels."""
    records = [Record("r0", None, ["Zed"], ["a", "b", "c"], "c")]
    logps, reference = [[-1.0, -2.0, -5.0]], [[-1.5, -2.5, -7.0]]  # rewards 0.5, 0.5, 2.0
    result = score_rankings(records, logps, reference, score="reward")
    assert result.metrics["hr@1"] == 0.0 and result.metrics["reward_hr@1"] == 1.0
    assert result.metrics["score"] == "reward"
    prediction = result.predictions[0]
    assert (prediction["rank"], prediction["logp_rank"], prediction["reward_rank"]) == (1, 3, 1)
    assert prediction["ranking"][0] == {"title": "c", "logp": -5.0, "reward": 2.0}
    assert set(result.metrics["ci95"]) == {"hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr", *(f"reward_{k}" for k in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mrr"))}
    with pytest.raises(ValueError, match="needs the reference"):
        score_rankings(records, logps, None, score="reward")


def test_ties_are_broken_by_a_seeded_order_not_by_position():
    """All-equal scores (an untrained adapter's rewards): each candidate wins for some record, evenly."""
    n, c = 2000, 20
    records = [Record(f"r{i}", None, ["Zed"], [f"t{j}" for j in range(c)], "t0") for i in range(n)]
    ranks = target_ranks(records, [[0.0] * c] * n)
    assert ranks == target_ranks(records, [[0.0] * c] * n)  # seeded: the same every time
    hits = sum(r == 1 for r in ranks) / n
    assert 0.03 < hits < 0.075  # about 1/20; by position the first candidate would always win
    assert sorted(set(ranks)) == list(range(1, c + 1))
    order = tie_order("r0", 5)
    assert sorted(order) == list(range(5)) and ranked_indices([1.0, 0.0, 1.0, 2.0, 0.0], "r0")[0] == 3
