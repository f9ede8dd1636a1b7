"""python -m export: a trained run -> merged model -> GGUF (f16, q8_0) + Ollama Modelfile.

Usage:
    python -m export                                  # outputs/smollm2-demo-cpu (make export)
    python -m export outputs/mistral-qlora            # any axolotl LoRA/QLoRA output_dir
    python -m export RUN_DIR --types f16,q8_0,q4_k_m --out DIR --name NAME

Steps, each printed as it starts:
  1. merge     the LoRA adapter into its base model (peft merge_and_unload; the base named in
               adapter_config.json, or --base-model) -> OUT/merged/ (safetensors + tokenizer)
  2. convert   llama.cpp's convert_hf_to_gguf.py -> OUT/NAME-f16.gguf, OUT/NAME-q8_0.gguf
               (q4_k_m, if asked for, is quantised from the f16 file by llama.cpp itself)
  3. Modelfile OUT/Modelfile for `ollama create` (plain-completion template, stop token)
  4. check     each GGUF in llama.cpp vs the merged model in transformers: tokenizer, greedy
               tokens, perplexity on a held-out passage (tolerances in export/check.py)
Writes OUT/export.json (times, file sizes, check results); exits 1 if a check fails, 2 on a
bad input. A run that was a full fine-tune (no adapter_config.json) is converted as it is. A run
that training stopped early (its output_dir holds stopped_early.json: the loss watchdog or the
NaN/inf stop) is refused in one line unless --allow-stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from core.errors import UserError, cli
from core.files import read_text_rows, staged_dir, staged_file, write_file, write_json
from core.launch import CODE_ROOT
from core.runs import (
    ADAPTER_CONFIG,
    CONTROL_TEXT,
    DEFAULT_EVAL_DATA,
    EXPORT_JSON,
    EXPORT_SUBDIR,
    MERGED_DIR,
    Run,
    refuse_stopped,
)
from export import LLAMA_CPP_PYTHON_VERSION
from export.check import DEFAULT_GREEDY_TOKENS, DEFAULT_PROMPT
from export.converter import find_converter

DEFAULT_RUN = Path("outputs/smollm2-demo-cpu")  # the output_dir of `make demo`'s recipe
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZE_TYPES = ("q4_k_m", "q5_k_m", "q4_0")  # quantised from f16 by llama.cpp (llama_cpp)
DTYPES = ("auto", "float32", "bfloat16", "float16")



def banner(step: int, title: str) -> None:
    print(f"\n=== [{step}/4] {title} ===", flush=True)


# --------------------------------------------------------------------------- inputs


def read_run(run_dir: Path, base_model: str | None) -> tuple[str | None, bool]:
    """(base model reference, is_adapter) of an axolotl output_dir."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found: pass the output_dir of a finished "
                          f"run (make demo writes {DEFAULT_RUN})")
    run = Run.from_output_dir(run_dir)
    config = run.adapter_config
    if config.is_file():
        if not run.has_adapter():
            raise UserError(f"{run_dir} has {ADAPTER_CONFIG} but no adapter_model.safetensors:"
                              " the run did not finish; re-run its axolotl train command")
        try:
            base = base_model or json.loads(config.read_text())["base_model_name_or_path"]
        except (ValueError, KeyError):
            raise UserError(f"{config} is not a PEFT adapter config (no base_model_name_or_path);"
                              " pass --base-model") from None
        local = Path(base).expanduser()
        if base.startswith((".", "/", "~")) and not (local / "config.json").is_file():
            raise UserError(f"base model {base} (from {config}) not found: build it (python -m "
                              "models.smollm2) or pass --base-model DIR")
        return base, True
    if (run_dir / "config.json").is_file() and any(run_dir.glob("model*.safetensors")):
        return None, False  # a full fine-tune: already a complete model
    raise UserError(f"{run_dir} holds neither a LoRA adapter ({ADAPTER_CONFIG}) nor a full "
                      "model (config.json + model*.safetensors): pass an axolotl output_dir")


def read_passage(path: Path | None) -> tuple[str, str]:
    """(text, source) of the passage the perplexity check scores: the first held-out row."""
    candidates = [path] if path else [DEFAULT_EVAL_DATA, CONTROL_TEXT]
    for candidate in candidates:
        if candidate is None or not candidate.is_file():
            continue
        if candidate.suffix == ".jsonl":
            return read_text_rows(candidate)[0], f"{candidate} (first row)"
        return candidate.read_text(encoding="utf-8").strip(), str(candidate)
    raise UserError(f"passage file {path or DEFAULT_EVAL_DATA} not found: run python -m "
                      "data_prep, or pass --passage FILE (text or JSONL with a 'text' field)")


def parse_types(value: str) -> list[str]:
    types = [t.strip().lower() for t in value.split(",") if t.strip()]
    bad = [t for t in types if t not in CONVERTER_TYPES + QUANTIZE_TYPES]
    if bad or not types:
        raise argparse.ArgumentTypeError(
            f"unknown GGUF type(s) {', '.join(bad) or '(none)'}; choose from "
            + ", ".join(CONVERTER_TYPES + QUANTIZE_TYPES))
    if any(t in QUANTIZE_TYPES for t in types) and "f16" not in types:
        types.insert(0, "f16")  # k-quants are made from the f16 file
    return types


# --------------------------------------------------------------------------- steps


def merge(run_dir: Path, base: str, target: Path, dtype: str) -> dict:
    """Base + adapter -> one plain model directory (core.files.staged_dir: all or nothing)."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype == "auto":
        config = AutoConfig.from_pretrained(base)
        torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        torch_dtype = torch_dtype if isinstance(torch_dtype, torch.dtype) else \
            getattr(torch, str(torch_dtype or "float32").removeprefix("torch."), torch.float32)
    else:
        torch_dtype = getattr(torch, dtype)
    print(f"base {base} ({str(torch_dtype).removeprefix('torch.')}) + adapter {run_dir}",
          flush=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
    model = PeftModel.from_pretrained(model, run_dir).merge_and_unload()
    has_tokenizer = any((run_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(run_dir if has_tokenizer else base)
    # A completion fine-tune: drop the base's chat template, so GGUF front ends (LM Studio,
    # llama.cpp's chat mode) do not wrap prompts in chat turns the adapter never saw.
    tokenizer.chat_template = None
    model.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with staged_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        plain_byte_level_bpe(staging, tokenizer)
    return {"dtype": str(torch_dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters())}


def plain_byte_level_bpe(model_dir: Path, tokenizer) -> bool:
    """Make a byte-level BPE tokenizer.json look like one, without changing any encoding.

    Tokenizers that transformers rebuilt from a GGUF file (the demo's SmolLM2) are byte-level BPE
    (GPT-2 style: every byte is a token) but carry `byte_fallback: true` and a SentencePiece-style
    decoder chain. llama.cpp's converter then takes the vocabulary for a SentencePiece one
    (`tokenizer.ggml.model = llama`), and llama.cpp would tokenise text differently from the
    model's training. Byte fallback can never fire in a byte-level vocabulary, so switching it
    off and keeping only the ByteLevel decoder changes no encoding (checked here on a sample);
    the converter then recognises the GPT-2 style vocabulary and its pre-tokenizer.
    """
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, decoder, pre = spec.get("model") or {}, spec.get("decoder") or {}, \
        json.dumps(spec.get("pre_tokenizer"))
    decoders = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    byte_level = [d for d in decoders if d.get("type") == "ByteLevel"]
    if not (model.get("type") == "BPE" and model.get("byte_fallback") and byte_level
            and '"ByteLevel"' in pre):
        return False
    model["byte_fallback"] = False
    spec["decoder"] = byte_level[0]
    path.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")
    sample = ("It was on a dreary night of November, 1797 — \"I beheld the wretch\"; "
              "naïve café\n\n\tend<|endoftext|>")
    fixed = AutoTokenizer.from_pretrained(model_dir)
    if fixed(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        raise UserError(f"{path}: making the byte-level BPE tokenizer plain changed its "
                          "encoding; export cannot guarantee llama.cpp tokenises like training")
    print("tokenizer.json: byte-level BPE written without byte fallback (same encodings)")
    return True


def convert(converter: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py MODEL --outtype T --outfile F, as a subprocess of this Python."""
    with staged_file(outfile) as tmp:
        cmd = [sys.executable, str(converter), str(model_dir), "--outtype", outtype,
               "--outfile", str(tmp)]
        print("$ python " + " ".join(cmd[1:]), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tmp.stat().st_size:
            sys.stderr.write(proc.stderr[-4000:])
            raise UserError(f"llama.cpp's converter failed on {model_dir} (exit "
                            f"{proc.returncode}; its log is above)")


def quantize(source: Path, outfile: Path, qtype: str) -> None:
    """A k-quant (e.g. Q4_K_M) from the f16 GGUF with llama.cpp's own quantiser."""
    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    print(f"llama_model_quantize({source.name} -> {outfile.name}, {qtype.upper()})", flush=True)
    with staged_file(outfile) as tmp:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0 or not tmp.stat().st_size:
            raise UserError(f"llama.cpp could not quantise {source} to {qtype} (status {status})")


def modelfile_text(gguf_name: str, eos_token: str, model_name: str, n_ctx: int) -> str:
    """An Ollama Modelfile for a plain completion model (no chat turns)."""
    stop = json.dumps(eos_token)
    return f'''# Ollama Modelfile for {model_name}: a completion model fine-tuned on Frankenstein.
#   ollama create {model_name} -f Modelfile
#   ollama run {model_name} "It was on a dreary night of November that"
# The prompt is passed through as it is (no chat template): the model continues your text.
FROM ./{gguf_name}
TEMPLATE """{{{{ .Prompt }}}}"""
PARAMETER stop {stop}
PARAMETER temperature 0.7
PARAMETER top_p 0.9
PARAMETER repeat_penalty 1.1
PARAMETER num_ctx {n_ctx}
PARAMETER num_predict 200
'''


def write_modelfile(out: Path, gguf: Path, merged: Path, model_name: str) -> Path:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    config = AutoConfig.from_pretrained(merged)
    n_ctx = min(int(getattr(config, "max_position_embeddings", 2048) or 2048), 4096)
    return write_file(out / "Modelfile",
                      modelfile_text(gguf.name, tokenizer.eos_token, model_name, n_ctx))


# --------------------------------------------------------------------------- driver


def convert_all(converter: Path, merged: Path, out: Path, name: str, types: list[str],
                seconds: dict[str, float]) -> dict[str, Path]:
    """OUT/NAME-TYPE.gguf of each type (k-quants from the f16 file), each one's seconds."""
    files: dict[str, Path] = {}
    for gguf_type in types:
        outfile = out / f"{name}-{gguf_type}.gguf"
        t0 = time.perf_counter()
        if gguf_type in CONVERTER_TYPES:
            convert(converter, merged, outfile, gguf_type)
        else:
            quantize(files["f16"], outfile, gguf_type)
        seconds[f"gguf_{gguf_type}"] = time.perf_counter() - t0
        files[gguf_type] = outfile
        print(f"{outfile}: {outfile.stat().st_size / 2**20:.1f} MiB "
              f"in {seconds[f'gguf_{gguf_type}']:.1f} s", flush=True)
    return files


def check_all(files: dict[str, Path], merged: Path, prompt: str, passage: str,
              greedy_tokens: int) -> list[dict]:
    """Each GGUF in llama.cpp against the merged model in transformers (export/check.py), one
    line each."""
    from export.check import Reference

    checks = []
    reference = Reference(merged, prompt, passage, greedy_tokens)
    for gguf_type, path in files.items():
        result = reference.compare(path, gguf_type)
        checks.append(result)
        tol = result["ppl_tolerance_pct"]
        split = result["greedy_divergence"]
        tie = (f" (then a near-tie: logit margins {split['reference_margin']:.4f} / "
               f"{split['llama_cpp_margin']:.4f})" if split and split["near_tie"] else "")
        print(f"{path.name}: tokenizer {'same' if result['tokenizer_matches'] else 'DIFFERS'}"
              f", greedy {result['greedy_leading_matches']}/{result['greedy_tokens']} tokens "
              f"match{tie}, perplexity {result['ppl_llama_cpp']:.4f} vs "
              f"{result['ppl_transformers']:.4f} ({result['ppl_diff_pct']:+.3f} %"
              + (f", tolerance ±{tol} %" if tol is not None else ", no tolerance") + ") -> "
              + ("ok" if result["passed"] else "FAILED"), flush=True)
    return checks


def run_export(args) -> dict:
    os.chdir(CODE_ROOT)  # adapter configs name their base relative to the repository root
    run_dir = args.run_dir
    if not args.allow_stopped:
        refuse_stopped(run_dir, "pass --allow-stopped")
    base, is_adapter = read_run(run_dir, args.base_model)
    out = args.out or run_dir / EXPORT_SUBDIR
    name = args.name or run_dir.resolve().name
    passage, passage_source = read_passage(args.passage)
    if not args.no_check or any(t in QUANTIZE_TYPES for t in args.types):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("llama-cpp-python is not installed (the llama.cpp runtime that "
                              "checks the GGUF): run `make setup-export`, or pass --no-check"
                              ) from None
    converter = find_converter(args.converter)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    banner(1, f"merge: {run_dir} -> {out / MERGED_DIR}")
    t0 = time.perf_counter()
    if is_adapter:
        merged = out / MERGED_DIR
        merge_info = merge(run_dir, base, merged, args.dtype)
    else:
        merged, merge_info = run_dir, {"dtype": None, "parameters": None}
        print(f"{run_dir} is a full model: nothing to merge")
    seconds["merge"] = time.perf_counter() - t0

    banner(2, f"convert: llama.cpp {converter.name} -> {', '.join(args.types)}")
    files = convert_all(converter, merged, out, name, args.types, seconds)

    banner(3, f"Ollama Modelfile: {out / 'Modelfile'}")
    pick = next((t for t in ("q8_0", "q4_k_m", "f16") if t in files), args.types[0])
    modelfile = write_modelfile(out, files[pick], merged, name)
    print(f"FROM ./{files[pick].name}")

    checks = []
    if not args.no_check:
        banner(4, "check: llama.cpp vs transformers (tokenizer, greedy tokens, perplexity)")
        t0 = time.perf_counter()
        checks = check_all(files, merged, args.prompt, passage, args.greedy_tokens)
        seconds["check"] = time.perf_counter() - t0
    else:
        banner(4, "check: skipped (--no-check)")
    seconds["total"] = time.perf_counter() - start

    summary = {
        "run_dir": str(run_dir),
        "base_model": base,
        "merged_model": str(merged),
        "merge": merge_info,
        "converter": f"llama.cpp convert_hf_to_gguf.py from llama-cpp-python "
                     f"{LLAMA_CPP_PYTHON_VERSION}",
        "gguf": {t: {"path": str(p), "bytes": p.stat().st_size} for t, p in files.items()},
        "modelfile": str(modelfile),
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "check_prompt": args.prompt,
        "check_passage": passage_source,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }
    write_json(out / EXPORT_JSON, summary)
    print_summary(summary, out, name)
    return summary


def print_summary(summary: dict, out: Path, name: str) -> None:
    print("\n=== export summary ===")
    for gguf_type, info in summary["gguf"].items():
        print(f"{gguf_type:8s} {info['bytes'] / 2**20:8.1f} MiB  {info['path']}")
    if summary["checks"]:
        print("llama.cpp check: " + ("passed" if summary["passed"] else "FAILED")
              + f" ({len(summary['checks'])} GGUF file(s); details in {out / EXPORT_JSON})")
    print(f"export time: {summary['seconds']['total']:.0f} s")
    print(f"Ollama: cd {out} && ollama create {name} -f Modelfile && ollama run {name} "
          '"It was on a dreary night of November that"')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dir", type=Path, nargs="?", default=DEFAULT_RUN,
                        help=f"axolotl output_dir of a finished run (default {DEFAULT_RUN})")
    parser.add_argument("--out", type=Path, help="output directory (default RUN_DIR/export)")
    parser.add_argument("--name", help="file and Ollama model name (default: RUN_DIR's name)")
    parser.add_argument("--types", type=parse_types, default=parse_types("f16,q8_0"),
                        help="comma-separated GGUF types (default f16,q8_0; also f32, bf16, "
                             "q4_k_m, q5_k_m, q4_0)")
    parser.add_argument("--base-model", help="base model directory or hub id (default: the one "
                        "named in RUN_DIR/adapter_config.json)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="precision of the merge and the merged model (default: the base's)")
    parser.add_argument("--converter", type=Path,
                        help="llama.cpp's convert_hf_to_gguf.py (default: fetched, see "
                             "export/converter.py)")
    parser.add_argument("--passage", type=Path, help=f"text the perplexity check scores "
                        f"(default: first row of {DEFAULT_EVAL_DATA})")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="prompt of the greedy-token check")
    parser.add_argument("--greedy-tokens", type=int, default=DEFAULT_GREEDY_TOKENS)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the llama.cpp check (needs no llama-cpp-python)")
    parser.add_argument("--allow-stopped", action="store_true",
                        help="export a run that training stopped early anyway (its output_dir "
                             "holds stopped_early.json)")
    return parser.parse_args(argv)


def run_main(argv=None) -> int:
    args = parse_args(argv)
    for key in ("run_dir", "out", "passage", "converter"):  # before run_export's chdir
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).absolute())
    try:
        summary = run_export(args)
    except OSError as exc:  # disk full, no permission
        raise UserError(f"{exc.strerror or exc} ({exc.filename or 'output'}): free space or "
                        "pick another --out") from None
    return 0 if summary["passed"] else 1


main = cli(run_main, prog="export")


if __name__ == "__main__":
    raise SystemExit(main())
