"""Pre-flight checks of an Axolotl recipe, and the checker CLI.

    python -m integrations.recipe_guard recipes/*.yml            # static checks, no GPU needed
    python -m integrations.recipe_guard --runtime recipes/x.yml  # also what `axolotl train` checks

One line per problem, naming the recipe, the key or file, and the fix:
- a key that is not an Axolotl option (Axolotl silently ignores unknown keys, so a typo such as
  `lora_rnak` would train with the default rank), with the closest known key;
- a value of the wrong type (Axolotl's own pydantic validation, one line per error), no
  `base_model`;
- a local model directory or dataset file that does not exist (with the command that makes it);
- at run time: a passage longer than `sequence_len` (Axolotl would drop it silently), and a
  recipe that needs a CUDA GPU (4-bit/8-bit loading, bf16/fp16, flash attention) where CUDA
  cannot be used.
The known keys come from Axolotl's own pydantic models (and the listed plugins' option
schemas), not from a copy of its schema. Exit status of the CLI: 0 when every recipe is fine,
1 when a check found problems (see core/errors.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import sys
from pathlib import Path

from core.diagnostics import cuda_unavailable_problem
from core.errors import EXIT_FAILED, EXIT_OK, UserError, cli
from core.files import read_jsonl
from core.runs import load_recipe

# How to create the local artefacts our recipes point at.
MAKERS = {
    "models/tiny-mistral": "python -m models.tiny_mistral",
    "models/smollm2-135m": "python -m models.smollm2",
    "data/prepared/clean": "python -m data_prep --mode clean",
    "data/prepared/seed": "python -m data_prep --mode seed",
}
GPU_ONLY_KEYS = ("load_in_4bit", "load_in_8bit", "bf16", "fp16", "flash_attention")
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt")


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
# Known keys, from Axolotl's own pydantic models


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
    except ValueError as exc:  # axolotl's own checks beyond the schema raise ValueError
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
        try:
            texts = [str(row.get("text", "")) for row in read_jsonl(path)]
        except UserError as err:
            problems.append(f"{source}: {err}")
            continue
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
    except ImportError:  # pragma: no cover
        return False
    return torch.cuda.is_available()


def check_cuda(cfg: dict, source: str) -> list[str]:
    needs = [key for key in GPU_ONLY_KEYS if cfg.get(key) is True]
    if str(cfg.get("attn_implementation", "")).startswith("flash"):
        needs.append("attn_implementation")
    if needs and not _cuda_available():
        # a GPU may be there with a driver too old for this torch: say so, not "no GPU"
        problem = cuda_unavailable_problem()
        if problem:
            return [f"{source}: needs an NVIDIA GPU ({', '.join(needs)}) and CUDA cannot start: "
                    f"{problem}"]
        fix = ("on a CPU run `make demo` or `axolotl train recipes/tiny-mistral-cpu.yml`"
               if needs != ["bf16"] else
               "for bf16 on a CPU set `bf16: false` and list the plugin "
               "integrations.bf16_autocast.Bf16AutocastPlugin (bf16 autocast over fp32 weights)")
        return [f"{source}: needs an NVIDIA GPU ({', '.join(needs)}) but CUDA is not available "
                f"here; {fix}"]
    return []


def check_recipe(cfg_or_path, runtime: bool = False) -> list[str]:
    """All problems found in a recipe (a path or an already-loaded dict)."""
    if isinstance(cfg_or_path, dict):
        cfg, source = cfg_or_path, str(cfg_or_path.get("axolotl_config_path", "recipe"))
    else:
        source = str(cfg_or_path)
        try:
            cfg = load_recipe(Path(cfg_or_path))
        except UserError as err:
            return [str(err)]
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
# The CLI


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integrations.recipe_guard",
                                     description="Check Axolotl recipes before training.")
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
    return EXIT_FAILED if failed else EXIT_OK


main = cli(run)
