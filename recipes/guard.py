"""Pre-flight checks and a finite-loss guard for our Axolotl recipes.

Usage:
    python -m recipes.guard recipes/*.yml          # static checks, no GPU needed
    python -m recipes.guard --runtime recipes/x.yml  # also the checks `axolotl train` makes here

Every recipe lists `recipes.guard.RecipeGuardPlugin` under `plugins:`. Axolotl calls the plugin's
`register()` before it validates the config, so `axolotl train recipes/x.yml` stops with one
clear line per problem instead of a traceback wall when:
- a key is not an Axolotl option (Axolotl itself silently ignores unknown keys, so a typo such as
  `lora_rnak` would otherwise train with the default rank),
- a value has the wrong type, or `base_model` is missing,
- the local model directory or a dataset file does not exist (with the command that makes it),
- a passage is longer than `sequence_len` (Axolotl would silently drop it),
- the recipe needs a CUDA GPU (4-bit/8-bit loading, bf16/fp16, flash attention) and there is none.
During training the plugin's callback stops the run with a clear message and a non-zero exit as
soon as the logged loss or gradient norm is NaN/inf (Axolotl's loss watchdog only compares
`loss > threshold`, which is False for NaN, and exits 0 having saved the broken adapter).

Reliability fixes Axolotl 0.19 lacks:
- `seed` also seeds the LoRA initialisation. Axolotl only seeds inside the HF Trainer, which is
  built after the adapter, so the LoRA A matrices (and with them every loss after the first
  update) differed from run to run.
- On auto-resume, a newest checkpoint without trainer_state.json (the run was killed while
  saving it, or a save ran out of disk; the Trainer writes that file last) is skipped for the
  newest complete one, instead of every re-run crashing ("Can't find a valid checkpoint" or
  FileNotFoundError for trainer_state.json) until the user deletes the folder.
- A resumed packed run sees the same passages in the same order as an uninterrupted one. Axolotl
  packs an epoch's batches from an unseeded RandomSampler when the dataloader is built; a fresh
  run re-packs them at the epoch start from accelerate's seeded sampler, but after a resume the
  batches packed at setup were used (accelerate's batch-skipping wrapper does not pass set_epoch
  on), so skipping the N trained batches skipped unseen passages and repeated seen ones. The
  order is now a function of (seed, epoch) whenever it is packed (the same order a fresh run
  got before).
- A checkpoint save that fails (disk full) stops with one line, not a traceback.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import math
import sys
from pathlib import Path

import yaml

try:  # the plugin base class only exists where axolotl is installed
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - static checks still work without axolotl's plugins
    BasePlugin = object

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object

# How to create the local artefacts our recipes point at.
MAKERS = {
    "models/tiny-mistral": "python -m models.tiny_mistral",
    "models/smollm2-135m": "python -m models.smollm2",
    "data/prepared/clean": "python -m data_prep --mode clean",
    "data/prepared/seed": "python -m data_prep --mode seed",
}
GPU_ONLY_KEYS = ("load_in_4bit", "load_in_8bit", "bf16", "fp16", "flash_attention")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")


class RecipeError(SystemExit):
    """Stops `axolotl train` with the message on stderr and exit status 1, no traceback."""


def _how_to_make(path: str) -> str:
    normalised = path.removeprefix("./").rstrip("/")
    for prefix, command in MAKERS.items():
        if normalised.startswith(prefix):
            return f"run `{command}` first"
    return "fix the path"


def looks_local(path: str) -> bool:
    """Local paths are written ./x, ../x, /x or ~/x; anything else may be a hub id."""
    return path.startswith((".", "/", "~"))


# ----------------------------------------------------------------------------------------------
# Known keys, from Axolotl's own pydantic models (not a copy of its schema)


def _plugin_input_models(plugin_names: list[str]) -> list[type]:
    from axolotl.integrations.base import load_plugin

    models = []
    for name in plugin_names:
        try:
            plugin = load_plugin(name)
        except (ImportError, AttributeError):
            continue  # axolotl reports plugins it cannot load itself
        args_path = plugin.get_input_args() if hasattr(plugin, "get_input_args") else None
        if args_path:
            module_name, class_name = args_path.rsplit(".", 1)
            module = __import__(module_name, fromlist=[class_name])
            models.append(getattr(module, class_name))
    return models


def _field_names(*models: type) -> set[str]:
    names = set()
    for model in models:
        for name, field in model.model_fields.items():
            names.add(name)
            for alias in (field.alias, field.validation_alias):
                if isinstance(alias, str):
                    names.add(alias)
                elif alias is not None and hasattr(alias, "choices"):
                    names.update(c for c in alias.choices if isinstance(c, str))
    return names


def _cli_arg_names() -> set[str]:
    """Options of the axolotl CLI commands, which it merges into the config it loads."""
    import dataclasses

    from axolotl.cli import args as cli_args

    return {
        field.name
        for obj in vars(cli_args).values()
        if dataclasses.is_dataclass(obj) and isinstance(obj, type)
        for field in dataclasses.fields(obj)
    }


def known_top_level_keys(plugin_names: list[str]) -> set[str]:
    from axolotl.utils.schemas.config import AxolotlInputConfig

    return (
        _field_names(AxolotlInputConfig, *_plugin_input_models(plugin_names)) | _cli_arg_names()
    )


def known_dataset_keys() -> set[str]:
    from axolotl.utils.schemas.datasets import SFTDataset

    return _field_names(SFTDataset)


def _unknown(keys, known: set[str], where: str, source: str) -> list[str]:
    problems = []
    for key in keys:
        if key not in known:
            guess = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean `{guess[0]}`?" if guess else "remove it or check Axolotl's docs"
            problems.append(f"{source}: unknown key `{where}{key}` ({hint})")
    return problems


# ----------------------------------------------------------------------------------------------
# The checks


def check_keys(cfg: dict, source: str) -> list[str]:
    problems = _unknown(cfg, known_top_level_keys(cfg.get("plugins") or []), "", source)
    dataset_keys = known_dataset_keys()
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(cfg.get(group) or []):
            if isinstance(entry, dict):
                problems += _unknown(entry, dataset_keys, f"{group}[{i}].", source)
    return problems


def check_types(cfg: dict, source: str) -> list[str]:
    """Axolotl's own validation, its errors condensed to one line each."""
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from pydantic import ValidationError

    try:
        validate_config(DictDefault(copy.deepcopy(cfg)))
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"]) or "config"
            got = error.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{source}: `{where}`: {error['msg']}{shown}")
        return lines
    except ValueError as exc:
        return [f"{source}: {exc}"]
    return []


def check_paths(cfg: dict, source: str) -> list[str]:
    problems = []
    base_model = cfg.get("base_model")
    if not base_model:
        problems.append(f"{source}: missing `base_model`; set a hub id or a local model directory")
    elif looks_local(str(base_model)) and not Path(base_model).expanduser().is_dir():
        problems.append(
            f"{source}: base_model `{base_model}` not found; {_how_to_make(str(base_model))}"
        )
    for group in ("datasets", "test_datasets"):
        for i, entry in enumerate(cfg.get(group) or []):
            path = str((entry or {}).get("path", ""))
            is_file_like = looks_local(path) or path.endswith(LOCAL_DATA_SUFFIXES)
            if path and is_file_like and not Path(path).expanduser().exists():
                problems.append(
                    f"{source}: {group}[{i}].path `{path}` not found; {_how_to_make(path)}"
                )
    return problems


def _load_tokenizer(cfg: dict):
    """The recipe's tokenizer when it is local (or Mistral-7B-v0.1's, which ships offline)."""
    name = cfg.get("tokenizer_config") or cfg.get("base_model") or ""
    if looks_local(str(name)) and Path(name).expanduser().is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
    if str(name).startswith("mistralai/Mistral-7B-v0.1"):
        from data_prep.tokenizer import load_mistral_tokenizer

        return load_mistral_tokenizer()
    return None


def check_sequence_len(cfg: dict, source: str) -> list[str]:
    """Every passage, with BOS and EOS, must fit in sequence_len (Axolotl drops longer ones)."""
    sequence_len = cfg.get("sequence_len")
    if not isinstance(sequence_len, int):
        return []
    files = []
    for group in ("datasets", "test_datasets"):
        for entry in cfg.get(group) or []:
            path = Path(str((entry or {}).get("path", ""))).expanduser()
            if path.is_file() and path.suffix == ".jsonl":
                files.append(path)
    if not files:
        return []
    tokenizer = _load_tokenizer(cfg)
    if tokenizer is None:
        return []
    problems = []
    for path in files:
        texts = [json.loads(line).get("text", "") for line in path.open(encoding="utf-8")]
        lengths = [len(ids) + 2 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        longest = max(lengths, default=0)
        if longest > sequence_len:
            over = sum(n > sequence_len for n in lengths)
            problems.append(
                f"{source}: {over} passage(s) in {path} are longer than sequence_len "
                f"{sequence_len} (longest {longest} tokens with BOS/EOS); raise sequence_len or "
                f"re-run data_prep with a smaller --max-tokens"
            )
    return problems


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def check_cuda(cfg: dict, source: str) -> list[str]:
    needs = [key for key in GPU_ONLY_KEYS if cfg.get(key) is True]
    if str(cfg.get("attn_implementation", "")).startswith("flash"):
        needs.append("attn_implementation")
    if needs and not _cuda_available():
        try:  # a GPU may be there with a driver too old for this torch: say so, not "no GPU"
            from eval.errors import cuda_unavailable_problem

            problem = cuda_unavailable_problem()
        except ImportError:  # pragma: no cover - the repository's eval package is not importable
            problem = None
        if problem:
            return [f"{source}: needs an NVIDIA GPU ({', '.join(needs)}) and CUDA cannot start: "
                    f"{problem}"]
        return [
            f"{source}: needs an NVIDIA GPU ({', '.join(needs)}) but CUDA is not available here; "
            "on a CPU run `make demo` or `axolotl train recipes/tiny-mistral-cpu.yml`"
        ]
    return []


def check_recipe(cfg_or_path, runtime: bool = False) -> list[str]:
    """All problems found in a recipe (a path or an already-loaded dict)."""
    if isinstance(cfg_or_path, dict):
        cfg, source = cfg_or_path, str(cfg_or_path.get("axolotl_config_path", "recipe"))
    else:
        source = str(cfg_or_path)
        try:
            cfg = yaml.safe_load(Path(cfg_or_path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return [f"{source}: recipe file not found"]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            return [f"{source}: not valid YAML{where}; fix the indentation/quoting there"]
        if not isinstance(cfg, dict):
            return [f"{source}: expected a mapping of Axolotl options, got {type(cfg).__name__}"]
    cfg = {k: v for k, v in cfg.items() if k != "axolotl_config_path"}
    problems = check_keys(cfg, source) + check_paths(cfg, source)
    if not problems:  # type errors are noise while keys or paths are wrong
        problems += check_types(cfg, source)
    if runtime:
        problems += check_cuda(cfg, source)
        if not problems:
            problems += check_sequence_len(cfg, source)
    return problems


# ----------------------------------------------------------------------------------------------
# The Axolotl plugin


def _running_preprocess() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "preprocess" in sys.argv[:2] or (main_spec is not None and "preprocess" in main_spec.name)


class FiniteLossCallback(TrainerCallback):
    """Stops training with exit status 1 when a logged loss or grad norm is NaN/inf."""

    WATCHED = ("loss", "grad_norm", "eval_loss")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in self.WATCHED:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise RecipeError(  # newline: tqdm leaves the cursor after its progress bar
                    f"\nerror: {key} became {value} at step {state.global_step}; training stopped "
                    "before saving. Lower learning_rate (or check the data) and re-run; the last "
                    f"good checkpoint, if any, is in {args.output_dir}"
                )
        return control


# ----------------------------------------------------------------------------------------------
# Exact resume


class EpochSeededSampler:
    """A shuffled order of `size` items that depends only on (seed, epoch).

    Used as the base sampler of Axolotl's MultipackBatchSampler (`owner`), so the packed batches
    of an epoch are the same whenever they are generated: at the start of a fresh run, or after
    a resume, when the Trainer skips the batches the checkpoint already trained on.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.owner = size, seed, 0, None

    def set_epoch(self, epoch: int) -> None:
        # accelerate reaches this sampler through its SkipBatchSampler on resume, but not the
        # owner, whose cached batches would be another epoch's
        self.epoch = epoch
        if self.owner is not None and getattr(self.owner, "epoch", epoch) != epoch:
            self.owner.set_epoch(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.size, generator=generator).tolist()


def seed_packed_order(trainer, seed: int) -> None:
    """Make the trainer's multipack sampler shuffle with EpochSeededSampler."""
    from torch.utils.data import RandomSampler

    create = getattr(trainer, "_create_multipack_sampler", None)
    if create is None:  # pragma: no cover - another Axolotl version or trainer type
        return

    def create_seeded(base_sampler, dataset):
        if not (isinstance(base_sampler, RandomSampler) and base_sampler.generator is None):
            return create(base_sampler=base_sampler, dataset=dataset)
        order = EpochSeededSampler(len(dataset), seed)
        multipack = create(base_sampler=order, dataset=dataset)
        order.owner = multipack
        return multipack

    trainer._create_multipack_sampler = create_seeded


def one_line_save_errors(trainer) -> None:
    """A checkpoint save that fails (disk full, file-size limit) stops with one line instead of
    a traceback through transformers/peft/safetensors; the partial checkpoint it leaves has no
    trainer_state.json, so the next run resumes from the one before (see post_trainer_create)."""
    save = trainer._save_checkpoint
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = OSError  # noqa: N806

    def guarded_save(*args, **kwargs):
        try:
            return save(*args, **kwargs)
        # torch.save reports a short write as RuntimeError ("unexpected pos ...")
        except (OSError, SafetensorError, RuntimeError) as exc:
            reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
            raise RecipeError(
                f"\nerror: saving checkpoint-{trainer.state.global_step} in "
                f"{trainer.args.output_dir} failed ({reason}); if the disk is full, free space "
                "and re-run the same command: it resumes from the newest complete checkpoint"
            ) from None

    trainer._save_checkpoint = guarded_save


def _checkpoint_complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it parses."""
    try:
        return "global_step" in json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False


def newest_complete_checkpoint(output_dir) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint-N, newer incomplete ones) in an Axolotl output_dir."""
    checkpoints = sorted(
        (p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    incomplete = []
    while checkpoints and not _checkpoint_complete(checkpoints[-1]):
        incomplete.insert(0, checkpoints.pop())
    return (checkpoints[-1] if checkpoints else None), incomplete


class RecipeGuardPlugin(BasePlugin):
    """Axolotl plugin: pre-flight checks at config load, finite-loss guard during training."""

    def register(self, cfg):
        problems = check_recipe(dict(cfg), runtime=not _running_preprocess())
        if problems:
            raise RecipeError("\n".join(f"error: {p}" for p in problems))

    def pre_lora_load(self, cfg, model):
        if cfg.get("seed") is not None:
            from transformers import set_seed

            set_seed(cfg["seed"])

    def post_trainer_create(self, cfg, trainer):
        one_line_save_errors(trainer)
        if cfg.get("sample_packing"):
            seed = cfg.get("seed")
            seed_packed_order(trainer, trainer.args.seed if seed is None else seed)
        # Axolotl's auto-resume (which runs after this hook) takes the highest checkpoint-N
        # unless resume_from_checkpoint is set.
        if not cfg.get("auto_resume_from_checkpoints") or cfg.get("resume_from_checkpoint"):
            return
        complete, incomplete = newest_complete_checkpoint(cfg["output_dir"])
        if incomplete:
            names = ", ".join(p.name for p in incomplete)
            print(
                f"warning: {names} in {cfg['output_dir']} has no complete trainer_state.json "
                f"(the run was killed, or the disk filled, while saving it); resuming from "
                f"{complete.name if complete else 'the start'} instead",
                file=sys.stderr,
            )
            if complete is not None:
                cfg["resume_from_checkpoint"] = str(complete)
            else:
                cfg["auto_resume_from_checkpoints"] = False

    def add_callbacks_pre_trainer(self, cfg, model):
        return [FiniteLossCallback()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Check Axolotl recipes before training.")
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument(
        "--runtime", action="store_true",
        help="also check CUDA availability and passage lengths, as `axolotl train` does",
    )
    args = parser.parse_args(argv)
    failed = 0
    for recipe in args.recipes:
        problems = check_recipe(recipe, runtime=args.runtime)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(f"ok: {recipe}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
