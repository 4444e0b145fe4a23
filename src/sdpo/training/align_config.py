"""The align stage's options, and what it takes from the SFT run it starts from.

An align run inherits the SFT run's base model, data, prompts, record draws and collaborative
tokens (`INHERITED`) unless given, and refuses a contradiction: the policy and its reference
must see the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdpo.data.negatives import STRATEGIES
from sdpo.errors import UserError
from sdpo.lm.adapters import check_adapter_folder
from sdpo.training.collaborative import SETTINGS
from sdpo.training.runs import read_run_config
from sdpo.training.sft import SFTConfig

LOSSES = ("sdpo", "dpo")
# Settings an align run takes from its SFT run unless given, and may not contradict.
INHERITED = ("model", "data", "domain", "prompt_seed", "subset_seed", *SETTINGS)
PATHS = ("data", "collaborative")  # the same data or model may lie elsewhere now (the model's SHA-256 is checked)


@dataclass
class AlignConfig(SFTConfig):
    """Preference-stage options: SFTConfig's plus the S-DPO ones.

    The LoRA shape (r, alpha, dropout, modules) is the SFT adapter's; the lora_* options
    here are not used.
    """

    sft: str = field(default="", metadata={"help": "SFT run folder (adapter + sdpo_config.yaml) to start from"})
    sft_sha256: str | None = field(default=None, metadata={
        "help": "SHA-256 of the SFT adapter's weights; recorded from --sft (a different one is refused)"})
    model: str | None = field(default=None, metadata={"help": "base model; default: the SFT run's (a different one is refused)"})
    prompt_seed: int | None = field(default=None, metadata={"help": "prompt phrasing seed; default: the SFT run's (a different one is refused)"})
    subset_seed: int | None = field(default=None, metadata={
        "help": "seed of the train_limit / eval_limit draws; default: the SFT run's, so a smaller train_limit takes records the SFT run trained on"})
    collaborative: str = field(default="", metadata={"help": "the collaborative model; default: the SFT run's (another one is refused)"})
    collaborative_place: str | None = field(default=None, metadata={"help": "default: the SFT run's (another one is refused)"})
    collaborative_score: bool | None = field(default=None, metadata={"help": "default: the SFT run's (another one is refused)"})
    collaborative_inject: str | None = field(default=None, metadata={"help": "default: the SFT run's (another one is refused)"})
    collaborative_folds: bool | None = field(default=None, metadata={
        "help": "out-of-fold signals for the training windows (sdpo baseline --folds K); default: as the SFT run read them"})
    loss: str = field(default="sdpo", metadata={"help": "sdpo (softmax over K negatives) or dpo (pairwise, averaged over K)"})
    negatives: int = field(default=3, metadata={"help": "K, negatives per record (1..19)"})
    negative_sampling: str = field(default="random", metadata={"help": "random (drawn once), resample (each epoch) or hard"})
    beta: float = field(default=1.0, metadata={"help": "reward temperature"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "alpha: adds alpha times the positive's per-token NLL to the preference loss, as RPO does (0: the paper's loss)"})
    boundary_negatives: bool = field(default=False, metadata={
        "help": "DynamicPO: each step trains on the negatives the policy scores at or above the positive (none: the top k-means cluster)"})
    dynamic_beta: bool = field(default=False, metadata={
        "help": "DynamicPO: a beta per negative from two margins of the policy's log-probs, within (0.5, 1.38) times --beta"})
    dynamic_beta_margin: float = field(default=6.0, metadata={"help": "DynamicPO's m in the dual-margin beta (the authors' code: 6)"})
    reference: str = field(default="precomputed", metadata={
        "help": "precomputed (scores cached once) or adapter (a frozen copy of the SFT adapter, run each step)"})
    share_trunk: bool = field(default=False, metadata={
        "help": "compute the layers below the first LoRA layer once per record, not in every step (an SFT run with --lora_layers N; "
                "with collaborative tokens, --no_train_projector)"})
    select_by: str = field(default="loss", metadata={"help": "keep the best checkpoint by validation loss or hr@1"})
    hr_limit: int = field(default=100, metadata={"help": "validation records ranked for eval hr@1"})
    output_dir: str = "runs/align"
    learning_rate: float = 1e-5

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"--beta must be above 0, got {self.beta}")
        if self.negatives < 1:
            raise ValueError(f"--negatives must be at least 1, got {self.negatives}")
        if self.hr_limit < 1:
            raise ValueError(f"--hr_limit must be at least 1, got {self.hr_limit}")
        if self.sft_weight < 0:
            raise ValueError(f"--sft_weight must be 0 or more, got {self.sft_weight}")
        if self.dynamic_beta_margin < 0:
            raise ValueError(f"--dynamic_beta_margin must be 0 or more, got {self.dynamic_beta_margin}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.negative_sampling not in STRATEGIES:
            raise ValueError(f"--negative_sampling must be one of {', '.join(STRATEGIES)}, got {self.negative_sampling!r}")
        if self.reference not in ("precomputed", "adapter"):
            raise ValueError(f"--reference must be precomputed or adapter, got {self.reference!r}")
        if self.reference == "adapter" and self.negative_sampling == "hard":
            raise ValueError("--negative_sampling hard picks negatives by reference scores: use --reference precomputed")
        if self.select_by not in ("loss", "hr@1"):
            raise ValueError(f"--select_by must be loss or hr@1, got {self.select_by!r}")
        if self.eval_strategy != "no":  # validate as we go and keep the best checkpoint
            self.load_best_model_at_end = True
            self.metric_for_best_model = "loss" if self.select_by == "loss" else "hr@1"
            self.greater_is_better = self.select_by == "hr@1"
        super().__post_init__()


def read_sft_run(sft_dir: str) -> dict:
    """The resolved config of an SFT run folder (its base model, data, prompts), checked."""
    if not sft_dir:
        raise UserError("align: no SFT run given. Pass --sft DIR (the output folder of sdpo sft).")
    values = read_run_config(sft_dir, "an SFT run folder")
    check_adapter_folder(sft_dir, "adapter of an SFT run")
    return values


def inherit_from_sft(config: AlignConfig, sft_run: dict) -> None:
    """Take the base model, data, prompts and record draws from the SFT run; refuse contradictions."""
    for key in INHERITED:
        mine, theirs = getattr(config, key), sft_run.get(key)
        if mine is None or mine == "":
            setattr(config, key, theirs)
        elif theirs is not None and key not in PATHS and mine != theirs:
            raise UserError(f"--{key} {mine!r} differs from the SFT run's {theirs!r} ({config.sft}). "
                            f"The policy and its reference must see the same {key}: leave --{key} out.")
    if config.collaborative_folds is None:
        config.collaborative_folds = bool(sft_run.get("collaborative_folds"))
        config.collaborative_folds_sha256 = config.collaborative_folds_sha256 or sft_run.get("collaborative_folds_sha256")
    if config.prompt_seed is None:
        config.prompt_seed = 0
    if config.subset_seed is None:
        config.subset_seed = 0
