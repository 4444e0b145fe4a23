"""The main job: run the stages a pipeline config lists and print one results table.

A pipeline config (see ``configs/quickstart.yaml``)::

    output_dir: runs/quickstart      # everything goes under here
    model: smollm2-135m              # the base LM
    seed: 0                          # training seed (and the data preparation's)
    prompt_seed: 0                   # prompts, record draws and precision: one setting for
    subset_seed: 0                   #   every stage, so evaluation reads what training read
    bf16: null                       #   (null: on where the hardware computes bf16 natively)
    data: {dataset: lastfm}          # fetch + prepare into OUTPUT/data (or {path: DIR})
    sft: {train_limit: 256, ...}     # any SFTConfig option; output in OUTPUT/sft
    align: {negatives: 3, ...}       # any AlignConfig option, from OUTPUT/sft; output in OUTPUT/<name>
    baselines: {models: [popularity, sasrec], ...}   # any BaselineConfig option; OUTPUT/baselines/NAME
                                     #   (an entry {model: sasrec, l2: "1e-4"} sets options for one model)
    evaluate: {split: test, limit: 200, protocols: [generate, rank]}   # stages: [...] evaluates only those;
                                     #   trunk_cache: false turns the shared-trunk cache off

``sft`` and ``align`` are one stage or a list of them, each named by its ``name`` option
(default: sft; s-dpo or dpo by its loss) and trained into OUTPUT/<name>; an align stage
starts from the SFT stage its ``from`` option names (default: the first). Evaluation covers the
zero-shot base model and every trained stage, protocol by protocol in the order listed; for the rank protocol a trained stage is also
ranked by its reward against its reference (the base model for SFT, the SFT model for an
align stage), from the reference stage's saved log-probs. A stage whose output is complete
is reused, and an interrupted training stage resumes from its last checkpoint, so re-running
a pipeline continues where it stopped; a finished stage trained with other options than the
config now gives is refused, not reused (an unfinished one is checked by ``--resume``). The
evaluations share a trunk cache (OUTPUT/eval/trunk-cache, see `sdpo.lm.trunk`): the decoder
layers that no evaluated adapter changes run once per batch, not once per stage (for
generation: over the prompt); each protocol's part of the cache is removed once every stage
is evaluated with it.

The output folder (the config's ``output_dir``, or ``--output_dir studies/NAME``) gets a
.gitignore that lets git carry the study to a fresh checkout (`sdpo.pipeline.study`); the
evaluations' per-record predictions are written gzip-compressed (predictions.jsonl.gz).

Modules: config (the config read and checked), run (`run_pipeline`), stages (training stages
and baselines), evaluate (`evaluate_model`, also `sdpo evaluate`), study, table.

Layer 7: imports `sdpo.recommend` (the rerank protocol), `sdpo.training`, `sdpo.baselines` and everything below them.
"""

from sdpo.pipeline.evaluate import evaluate_model
from sdpo.pipeline.run import run_pipeline

__all__ = ["evaluate_model", "run_pipeline"]
