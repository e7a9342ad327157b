"""Scorers: compare or score responses to a prompt. One interface (`Scorer`), three kinds:

- `judge` (`Judge`): an LLM on a chat engine asked the CAI paper's multiple-choice question; P(first
  preferred) from the option tokens' log-probs, both orders, ensembled over comparison principles.
- `reward_model` (`RewardModelScorer`): a sequence-classification model's logit per response.
- `implicit` (`ImplicitRewardScorer`): a DPO-trained model's `beta * (log pi - log pi_ref)`.

`rank_responses` picks chosen/rejected among several responses with any of them; `make_scorer`
builds one from a job's `ScorerSpec`.
"""

from workers.scoring.base import Comparison, Ranking, Scorer, rank_responses
from workers.scoring.factory import clear_scorer_cache, make_scorer
from workers.scoring.judge import Judge, JudgeEngine
from workers.scoring.torch_scorers import (
    ImplicitRewardScorer,
    RewardModelScorer,
    ScorerError,
    read_training_config,
)

__all__ = [
    "Comparison",
    "ImplicitRewardScorer",
    "Judge",
    "JudgeEngine",
    "Ranking",
    "RewardModelScorer",
    "Scorer",
    "ScorerError",
    "clear_scorer_cache",
    "make_scorer",
    "rank_responses",
    "read_training_config",
]
