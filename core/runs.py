"""What "a run" is: one Axolotl recipe, the data it trains and is scored on, and where its
outputs go, under which names.

`Run.from_recipe("recipes/mistral-qlora.yml")` reads the recipe once:

    run.base_model         its `base_model`
    run.train_data         the first `datasets` path       (default data/prepared/clean/train.jsonl)
    run.eval_data          the first `test_datasets` path  (default data/prepared/clean/eval.jsonl;
                           CONTROL_TEXT, eval/control_passage.txt, is scored beside it)
    run.load_in_4bit, run.eos_token, run.pad_token          (`load_in_4bit`, `special_tokens`)
    run.output_dir         its `output_dir`: the adapter, checkpoint-N/, runs/ (TensorBoard)
    run.eval_dir           output_dir/eval/: perplexity.{json,md}, generations.{json,md},
                           evaluation.json (what `python -m eval` ran, its seconds, key metrics)
    run.report_md, run.chart_dir      output_dir/report.md, output_dir/report/*.png
    run.merged_dir         output_dir/merged/ (axolotl merge-lora)
    run.export_dir         output_dir/export/: python -m export's GGUF files and export.json
                           (run.export_json), which python -m export.serve serves

`Run.from_output_dir(DIR)` is the same for a bare run directory (no recipe: default data).
Checkpoints: `checkpoints`, `newest_complete_checkpoint` (the Trainer writes trainer_state.json
last: a checkpoint without a readable one was cut short), `newest_trainer_state` (the log of the
furthest step; truncated files skipped). `write_recipe` writes a recipe with overrides (tests,
the demo's shortened run, the benchmark's and gpu-check's generated recipes).

A run that training stopped early (Axolotl's loss watchdog, the recipe guard's NaN/inf stop)
holds output_dir/stopped_early.json: what crossed which threshold at which step, and what to
try (written by integrations/recipe_guard, removed when a later training of the same output_dir
finishes). `read_stop_record(output_dir)` / `run.stop_record()` read it; `refuse_stopped(
output_dir, go_on)` is the one line with which the commands that use a run's adapter (`python
-m eval`, `python -m export`, `axolotl merge-lora` through the recipe guard) stop, unless told
to go on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.errors import UserError
from core.files import write_file

# -- names inside a run's output_dir ----------------------------------------------------------
EVAL_SUBDIR = "eval"
PERPLEXITY_JSON = "perplexity.json"
PERPLEXITY_MD = "perplexity.md"
GENERATIONS_JSON = "generations.json"
GENERATIONS_MD = "generations.md"
EVALUATION_JSON = "evaluation.json"
REPORT_MD = "report.md"
CHART_DIR = "report"
TENSORBOARD_DIR = "runs"
MERGED_DIR = "merged"
EXPORT_SUBDIR = "export"  # python -m export's default output: GGUF files, Modelfile, merged/
EXPORT_JSON = "export.json"  # in EXPORT_SUBDIR: sizes, times, the llama.cpp check, GGUF paths
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHECKPOINT_PREFIX = "checkpoint-"
STOPPED_EARLY_JSON = "stopped_early.json"

# -- data a recipe is trained and scored on when it names none --------------------------------
DEFAULT_TRAIN_DATA = Path("data/prepared/clean/train.jsonl")
DEFAULT_EVAL_DATA = Path("data/prepared/clean/eval.jsonl")
# the text every evaluation also scores, to see what training did to other prose (eval/ ships it)
CONTROL_TEXT = Path(__file__).resolve().parents[1] / "eval" / "control_passage.txt"

# -- metric keys of the eval outputs -----------------------------------------------------------
BASE, ADAPTER = "base", "adapter"  # the models scored (perplexity.json "models")
HELD_OUT, CONTROL = "held-out", "control"  # kinds of scored text (perplexity.json "datasets")
CORPUS_PPL = "corpus_ppl"  # token-weighted perplexity, per model and dataset
# evaluation.json: {"base": ..., "adapter": ..., "change_pct": ...} of the first held-out and
# the first control dataset's corpus perplexity
HELD_OUT_CORPUS_PPL = "held_out_corpus_ppl"
CONTROL_CORPUS_PPL = "control_corpus_ppl"
TOKENS_TRAINED = "tokens/trainable"  # Axolotl's log_history count of trained (real) tokens


# ---------------------------------------------------------------------------------------------
# Recipes


def load_recipe(path: Path) -> dict:
    """The mapping of an Axolotl recipe; UserError (one line naming the file) otherwise."""
    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a directory, not a recipe file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}; fix the indentation/quoting there"
                        ) from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a mapping of Axolotl options, got "
                        f"{type(cfg).__name__}")
    return cfg


def merge_config(base: dict, overrides: dict) -> dict:
    """`base` updated with `overrides`, recursively for mappings; an override of None deletes
    the key (Axolotl treats an absent key as its default)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`--set KEY=VALUE` options (VALUE is YAML: `3`, `false`, `null`, `[a, b]`) as a mapping."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE (VALUE is YAML)")
        overrides[key] = yaml.safe_load(value)
    return overrides


def write_recipe(source: Path | dict, target: Path, overrides: dict | None = None,
                 header: str | None = None) -> Path:
    """The recipe `source` (a file or a mapping) with `overrides` (see merge_config), written
    to `target` atomically; `header` becomes a leading `# ...` comment."""
    cfg = load_recipe(source) if not isinstance(source, dict) else source
    cfg = merge_config(cfg, overrides or {})
    comment = "".join(f"# {line}\n" for line in header.splitlines()) if header else ""
    write_file(Path(target), comment + yaml.safe_dump(cfg, sort_keys=False))
    return Path(target)


def first_path(cfg: dict, key: str) -> Path | None:
    """The `path` of the first entry of a dataset list (`datasets`, `test_datasets`)."""
    entries = cfg.get(key) or []
    entry = entries[0] if isinstance(entries, list) and entries else {}
    return Path(entry["path"]) if isinstance(entry, dict) and entry.get("path") else None


# ---------------------------------------------------------------------------------------------
# A run


class _InOutputDir:
    """A path in a run's output_dir, as an attribute of the run (`run.report_md`)."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, run, owner=None):
        return self if run is None else run.output_dir.joinpath(*self.parts)


@dataclass(frozen=True)
class Run:
    """A recipe's run (see the module docstring); `config` is the recipe's mapping."""

    output_dir: Path | None
    recipe: Path | None = None
    config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_recipe(cls, path: Path) -> Run:
        return cls.from_config(load_recipe(path), Path(path))

    @classmethod
    def from_config(cls, cfg: dict, recipe: Path | None = None) -> Run:
        output_dir = cfg.get("output_dir")
        return cls(Path(output_dir) if output_dir else None, recipe, dict(cfg))

    @classmethod
    def from_output_dir(cls, output_dir: Path) -> Run:
        return cls(Path(output_dir))

    # -- what the recipe says
    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model")
        return str(value) if value else None

    @property
    def train_data(self) -> Path:
        return first_path(self.config, "datasets") or DEFAULT_TRAIN_DATA

    @property
    def eval_data(self) -> Path:
        return first_path(self.config, "test_datasets") or DEFAULT_EVAL_DATA

    @property
    def load_in_4bit(self) -> bool:
        return bool(self.config.get("load_in_4bit"))

    def _special_token(self, name: str) -> str | None:
        special = self.config.get("special_tokens") or {}
        return special.get(name) if isinstance(special, dict) else None

    @property
    def eos_token(self) -> str | None:
        return self._special_token("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_token("pad_token")

    # -- where its outputs go (paths under output_dir)
    eval_dir = _InOutputDir(EVAL_SUBDIR)
    perplexity_json = _InOutputDir(EVAL_SUBDIR, PERPLEXITY_JSON)
    generations_json = _InOutputDir(EVAL_SUBDIR, GENERATIONS_JSON)
    evaluation_json = _InOutputDir(EVAL_SUBDIR, EVALUATION_JSON)
    report_md = _InOutputDir(REPORT_MD)
    chart_dir = _InOutputDir(CHART_DIR)
    tensorboard_dir = _InOutputDir(TENSORBOARD_DIR)
    merged_dir = _InOutputDir(MERGED_DIR)
    export_dir = _InOutputDir(EXPORT_SUBDIR)
    export_json = _InOutputDir(EXPORT_SUBDIR, EXPORT_JSON)
    adapter_config = _InOutputDir(ADAPTER_CONFIG)

    def has_adapter(self) -> bool:
        return self.adapter_config.is_file() and any(
            (self.output_dir / name).is_file() for name in ADAPTER_WEIGHTS)

    # -- its training state
    def stop_record(self) -> dict | None:
        return read_stop_record(self.output_dir)

    def newest_trainer_state(self) -> tuple[Path, dict] | None:
        return newest_trainer_state(self.output_dir)

    def tokens_trained(self) -> int | None:
        """Real (non-padding) tokens trained, from the newest readable trainer log."""
        for _, state in sorted(trainer_states(self.output_dir), key=_state_rank, reverse=True):
            counts = [row[TOKENS_TRAINED] for row in state.get("log_history") or []
                      if isinstance(row, dict) and TOKENS_TRAINED in row]
            if counts:
                return int(counts[-1])
        return None


# ---------------------------------------------------------------------------------------------
# Checkpoints and trainer state


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders by step (N as a number, as Axolotl's auto-resume counts them)."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def read_trainer_state(path: Path) -> dict | None:
    """A trainer_state.json, or None when it is missing, unreadable, truncated or not a state
    (no `global_step`): the Trainer writes it last, so such a checkpoint was cut short."""
    try:
        state = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "global_step" in state else None


def checkpoint_complete(checkpoint: Path) -> bool:
    return read_trainer_state(Path(checkpoint) / TRAINER_STATE) is not None


def newest_complete_checkpoint(output_dir: Path) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint-N or None, the incomplete ones newer than it)."""
    found = checkpoints(output_dir)
    incomplete = []
    while found and not checkpoint_complete(found[-1]):
        incomplete.insert(0, found.pop())
    return (found[-1] if found else None), incomplete


def trainer_state_files(output_dir: Path) -> list[tuple[Path, bool]]:
    """(path, is top level) of every trainer_state.json a run may hold: the top-level one
    (written at the end of training) and each checkpoint's."""
    output_dir = Path(output_dir)
    files = [(c / TRAINER_STATE, False) for c in checkpoints(output_dir)
             if (c / TRAINER_STATE).is_file()]
    top = output_dir / TRAINER_STATE
    return files + ([(top, True)] if top.is_file() else [])


def _state_rank(found: tuple[tuple[Path, bool], dict]) -> tuple[int, bool]:
    (_, is_top), state = found
    step = state.get("global_step")
    return (step if isinstance(step, int) else 0, is_top)


def trainer_states(output_dir: Path) -> list[tuple[tuple[Path, bool], dict]]:
    """((path, is top level), state) of every readable trainer_state.json of a run."""
    out = []
    for path, is_top in trainer_state_files(output_dir):
        state = read_trainer_state(path)
        if state is not None:
            out.append(((path, is_top), state))
    return out


def newest_trainer_state(output_dir: Path) -> tuple[Path, dict] | None:
    """(path, state) of the readable trainer_state.json with the highest global_step (the
    top-level one wins a tie), or None; truncated or unreadable files are skipped."""
    states = trainer_states(output_dir)
    if not states:
        return None
    (path, _), state = max(states, key=_state_rank)
    return path, state


# ---------------------------------------------------------------------------------------------
# A run that stopped early


def write_stop_record(output_dir: Path, *, reason: str, step: int, max_steps: int | None,
                      summary: str, fix: str) -> Path:
    """output_dir/stopped_early.json (atomically): `reason` a key ("loss_watchdog",
    "non_finite"), `summary` what crossed which threshold at which step, `fix` what to try
    (ending in "and train again")."""
    import datetime as dt

    record = {"schema_version": 1, "stopped_early": True, "reason": reason, "step": step,
              "max_steps": max_steps, "summary": summary, "fix": fix,
              "time": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()}
    return write_file(Path(output_dir) / STOPPED_EARLY_JSON, json.dumps(record, indent=2) + "\n")


def read_stop_record(output_dir: Path | None) -> dict | None:
    """The stop record of a run directory, or None when it has none. A record that cannot be
    read still says the run stopped (it is never taken for a finished run)."""
    if output_dir is None:
        return None
    path = Path(output_dir) / STOPPED_EARLY_JSON
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not record.get("summary"):
        return {"summary": f"its {STOPPED_EARLY_JSON} cannot be read"}
    return record


def clear_stop_record(output_dir: Path) -> None:
    (Path(output_dir) / STOPPED_EARLY_JSON).unlink(missing_ok=True)


def refuse_stopped(output_dir: Path | None, go_on: str) -> None:
    """Stop (UserError) with one line when the run stopped early; `go_on` says how to use it
    anyway ("pass --allow-stopped")."""
    record = read_stop_record(output_dir)
    if record is None:
        return
    raise UserError(f"{output_dir}: training stopped early ({record['summary']}); what it saved "
                    f"is not a finished run, so train again ({STOPPED_EARLY_JSON} there says "
                    f"what to try) or {go_on} to use it anyway")
