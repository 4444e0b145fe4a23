"""The training log every run folder keeps: OUTPUT/log.jsonl, one JSON object per log entry.

Train entries carry ``loss`` (and the preference stage's reward metrics), evaluation entries
``eval_loss`` (and ``eval_hr@1``); every entry has its ``step``. A resumed run first drops the
entries written after the checkpoint it resumes from, so no step is logged twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from sdpo.io import write_text_atomic

LOG_FILE = "log.jsonl"


class JsonlLogger(TrainerCallback):
    """Appends every log entry (train and eval) to OUTPUT/log.jsonl, from the main process only."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(Path(args.output_dir) / LOG_FILE, "a", encoding="utf-8") as out:
                out.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def read_log(run_dir: str | Path) -> list[dict]:
    """The entries of RUN/log.jsonl (empty if there is none); a damaged last line (a crash mid-write) is dropped."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def trim_log(run_dir: str | Path, resume_from: str | None) -> None:
    """Start a fresh log, or keep only the entries up to the checkpoint a resume starts from."""
    path = Path(run_dir) / LOG_FILE
    if resume_from is None:
        path.unlink(missing_ok=True)
        return
    state = json.loads((Path(resume_from) / "trainer_state.json").read_text(encoding="utf-8"))
    kept = [e for e in read_log(run_dir) if e.get("step", 0) <= state["global_step"]]
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
