"""Committed folders travel: no tracked file records a path of the machine that wrote it, and a study reads from anywhere."""

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from sdpo.io import find_recorded
from sdpo.pipeline.study import record_paths_in_study
from sdpo.training.runs import changed_training_options, read_run_config

REPO = Path(__file__).resolve().parents[1]
# a home folder, the root user's, a temporary folder, a mount, this workplace's checkout root, a Windows profile
MACHINE_PATH = re.compile(r"(?<![\w.:/~-])(/root/|/home/[\w.-]+/|/Users/[\w.-]+/|/tmp/|/var/tmp/|/var/folders/|/private/var/|/mnt/|/work/"
                          r"|[A-Za-z]:\\+Users\\+)")


def tracked_text(path: Path) -> str | None:
    """A tracked file's text (a gzip-compressed one's too); None for binary files (weights, plots)."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


CUES = ("/root/", "/home/", "/Users/", "/tmp/", "/var/", "/private/", "/mnt/", "/work/", ":\\")  # fast substring checks first


def machine_paths(text: str) -> list[tuple[int, str]]:
    if not any(cue in text for cue in CUES) or not MACHINE_PATH.search(text):
        return []
    return [(number, line.strip()[:160]) for number, line in enumerate(text.splitlines(), start=1) if MACHINE_PATH.search(line)]


def test_the_pattern_finds_machine_paths_and_leaves_urls_and_relative_paths():
    found = ["/root/.cache/sdpo/models/smollm2-135m", "data: /work/main/studies/x/data", "at /tmp/pytest-1/x", "/home/ana/data",
             '"C:\\\\Users\\\\ana\\\\runs"', "/Users/ana/runs"]
    kept = ["https://github.com/zhangt766/LLaRA_Lastfm/tree/main/data", "studies/ml100k/data", "${TMPDIR:-/tmp}/sdpo-gpu", "../shared/data",
            "runs/tmp/x", "docs/home/page.md"]
    assert [bool(MACHINE_PATH.search(t)) for t in found] == [True] * len(found)
    assert [bool(MACHINE_PATH.search(t)) for t in kept] == [False] * len(kept)


def test_no_tracked_file_records_an_absolute_path_of_a_machine():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    assert len(files) > 100
    found = []
    for name in filter(None, files):
        if name == "tests/test_portable.py":  # this file: the patterns and their examples
            continue
        text = tracked_text(REPO / name)
        if text is not None:
            found += [f"{name}:{number}: {line}" for number, line in machine_paths(text)]
    assert not found, "tracked files record paths of the machine that wrote them:\n" + "\n".join(found[:40])


def test_shipped_adapters_name_their_base_model_by_its_hub_id():
    configs = [*REPO.glob("adapters/*/adapter_config.json"), *REPO.glob("studies/*/*/adapter_config.json")]
    assert configs
    assert {json.loads(p.read_text())["base_model_name_or_path"] for p in configs} == {"HuggingFaceTB/SmolLM2-135M-Instruct"}


def test_a_run_folder_finds_what_it_recorded_from_itself_or_the_folder_above(tmp_path, monkeypatch):
    study = tmp_path / "clone" / "studies" / "s"
    for folder in ("data", "sft", "s-dpo", "baselines/sasrec"):
        (study / folder).mkdir(parents=True)
    (study / "s-dpo" / "collaborative").mkdir()
    monkeypatch.chdir(tmp_path)  # another working folder than the one the study was run from
    assert find_recorded("data", study / "s-dpo") == study / "data"
    assert find_recorded("baselines/sasrec", study / "s-dpo") == study / "baselines/sasrec"
    assert find_recorded("collaborative", study / "s-dpo") == study / "s-dpo" / "collaborative"  # an export's own copy first
    assert find_recorded("studies/s/sft", study / "s-dpo") == study / "sft"  # an older sdpo: from the checkout's root
    assert find_recorded(str(study / "sft"), "anywhere") == study / "sft"
    assert find_recorded("nowhere", study / "s-dpo") == Path("nowhere")


def test_a_study_records_its_paths_relative_to_itself_and_reuses_stages_from_anywhere(tmp_path, monkeypatch):
    study = tmp_path / "checkout" / "studies" / "s"
    (study / "data").mkdir(parents=True)
    (study / "sft").mkdir()
    (study / "eval" / "sft-rank").mkdir(parents=True)
    config = {"data": str(study / "data"), "output_dir": str(study / "sft"), "collaborative": "", "model": "tiny", "learning_rate": 0.1}
    (study / "sft" / "sdpo_config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"adapter": str(study / "sft"), "data": str(study / "data"), "reference": "base model",
               "collaborative": {"path": str(tmp_path / "elsewhere" / "sasrec")}, "hr@1": 0.1}
    (study / "eval" / "sft-rank" / "metrics.json").write_text(json.dumps(metrics))
    (study / "results.json").write_text(json.dumps([metrics]))
    (study / ".gitignore").write_text("")
    changed = record_paths_in_study(study)
    assert {p.name for p in changed} == {"sdpo_config.yaml", "metrics.json", "results.json"}
    saved = yaml.safe_load((study / "sft" / "sdpo_config.yaml").read_text())
    assert (saved["data"], saved["output_dir"]) == ("data", "sft")
    rewritten = json.loads((study / "eval" / "sft-rank" / "metrics.json").read_text())
    assert (rewritten["adapter"], rewritten["data"], rewritten["reference"], rewritten["hr@1"]) == ("sft", "data", "base model", 0.1)
    assert rewritten["collaborative"]["path"] == str(tmp_path / "elsewhere" / "sasrec")  # outside the study: as it was
    assert record_paths_in_study(study) == []  # nothing left to rewrite

    moved = tmp_path / "fresh-clone" / "studies" / "s"
    shutil.copytree(study, moved)
    monkeypatch.chdir(tmp_path / "fresh-clone" / "studies")  # a third working folder, and absolute paths in the options now
    from types import SimpleNamespace

    now = SimpleNamespace(data=str(moved / "data"), output_dir=str(moved / "sft"), collaborative="", model="tiny", learning_rate=0.1)
    monkeypatch.setattr("sdpo.training.runs.config_to_dict", vars)
    assert changed_training_options(read_run_config(moved / "sft"), now) == []
    now.learning_rate = 0.2
    assert changed_training_options(read_run_config(moved / "sft"), now) == ["learning_rate 0.1 -> 0.2"]


def test_saving_an_adapter_that_names_the_hub_id_looks_nothing_up_on_the_hub(tmp_path, monkeypatch):
    import peft.utils.other

    from sdpo.lm.models import SMOLLM2_HUB_ID, LoraSettings, add_lora, load_model
    from sdpo.lm.quiet import quiet_peft

    model = add_lora(load_model("tiny")[0], LoraSettings(last_layers=1))
    model.peft_config["default"].base_model_name_or_path = SMOLLM2_HUB_ID
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    lookups = []
    monkeypatch.setattr(peft.utils.other, "file_exists", lambda repo, name, **kw: lookups.append((repo, name)) or True)
    monkeypatch.setattr(type(model.config), "from_pretrained", classmethod(lambda cls, *a, **kw: model.config), raising=False)
    model.save_pretrained(tmp_path / "plain")
    assert lookups == [(SMOLLM2_HUB_ID, "config.json")]  # what PEFT does by itself: ask the hub, at every save
    lookups.clear()
    with quiet_peft():
        model.save_pretrained(tmp_path / "quiet")
    assert lookups == [] and (tmp_path / "quiet" / "adapter_model.safetensors").is_file()
    assert "HF_HUB_OFFLINE" not in os.environ  # as it was before
