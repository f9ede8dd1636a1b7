"""python -m app TARGET: the base and the fine-tuned model side by side in the browser.

Usage:
    python -m app recipes/smollm2-demo-cpu.yml        # what `make app` runs (after make demo)
    python -m app outputs/mistral-qlora               # a run directory (holds the adapter)
    python -m app TARGET [--host 127.0.0.1] [--port 7860] [--model M]
        [--load-in-4bit | --no-load-in-4bit] [--train F | --no-memorisation]
    python -m app TARGET --measure [--rounds 3] [--prompt T] [--max-new-tokens 60] [--out F]

TARGET is read as `python -m eval` reads it (eval/pipeline.py): from a recipe its base_model,
output_dir (the run), first `datasets` path (the training text of the memorisation share),
load_in_4bit (nf4 on CUDA) and special_tokens; from a run directory the base model of its
adapter_config.json and data/prepared/clean/. The model is loaded once; the page streams the
base model's continuation (adapter switched off), then the fine-tuned one, with the same
settings and seed, and shows under each its tokens/s and the share of its word 8-grams found
verbatim in the training text (eval.generate's code: app/session.py). A second tab shows the
run's evaluation (RUN/eval/perplexity.json and RUN/report/*.png).

The page listens on 127.0.0.1:7860 only (never a public share link); --host 0.0.0.0 makes it
reachable from other machines (the Docker service does that inside its container and publishes
the port on the host's 127.0.0.1 only).

--measure loads the model, compares the two once as a warm-up and then --rounds times, and
prints JSON: time to the first token and tokens/s of each model (medians), the hardware and the
date; --out FILE writes it there too. No page is served.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
from pathlib import Path

from app.session import DEFAULT_PROMPT, Session, Settings, measure
from core.errors import UserError, cli
from core.files import write_json
from core.ports import check_listen

LOG = logging.getLogger("app")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m app", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("target", type=Path,
                        help="an axolotl recipe (.yml) or a run directory holding the adapter")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--model", help="base model (default: the recipe's base_model, else the "
                        "adapter's base_model_name_or_path)")
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="nf4 base weights on CUDA (default: the recipe's load_in_4bit)")
    parser.add_argument("--train", type=Path, help="training text of the memorisation share "
                        "(default: the recipe's first datasets path)")
    parser.add_argument("--no-memorisation", action="store_true")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    parser.add_argument("--eos-token", help="override EOS (default: the recipe's special_tokens)")
    parser.add_argument("--pad-token", help="override pad (default: the recipe's special_tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=60,
                        help="new tokens per continuation (the page's starting value)")
    parser.add_argument("--measure", action="store_true",
                        help="print time to first token and tokens/s as JSON; no page")
    parser.add_argument("--rounds", type=int, default=3, help="--measure: timed comparisons")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="--measure: the opening")
    parser.add_argument("--out", type=Path, help="--measure: also write the JSON here")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def plan(args) -> dict:
    """What to load, from TARGET as python -m eval reads it; every cheap check first (the run,
    its adapter, the base model, the training text), so a bad input fails in a second."""
    from eval import pipeline
    from eval.common import resolve_model_arg

    p = pipeline.plan(pipeline.Options(  # the run and its adapter, checked
        target=args.target, model=args.model, load_in_4bit=args.load_in_4bit, train=args.train,
        no_memorisation=args.no_memorisation, tokenizer=args.tokenizer,
        eos_token=args.eos_token, pad_token=args.pad_token))
    model, _ = resolve_model_arg(p.model, p.run.output_dir)  # the base model exists
    train = p.generation.train
    if train is not None and not Path(train).is_file():
        raise UserError(f"training text {train} not found (for the memorisation share): "
                        "run `python -m data_prep`, pass --train FILE or --no-memorisation")
    return {"run": p.run, "run_dir": p.run.output_dir, "model": model,
            "load_in_4bit": p.load_in_4bit, "tokenizer": args.tokenizer, "train": train,
            "eos_token": p.generation.eos_token, "pad_token": p.generation.pad_token}


def check_device(args, p: dict) -> None:
    """4-bit needs CUDA; said in one line before the load, naming the recipe when it asks."""
    if not p["load_in_4bit"]:
        return
    from eval.common import quiet_library_logs, resolve_device

    quiet_library_logs()
    try:
        resolve_device(load_in_4bit=True)
    except UserError as err:
        if args.load_in_4bit is not None or "needs a CUDA GPU" not in err.message:
            raise
        raise UserError(f"{args.target} sets load_in_4bit: true, which needs a CUDA GPU "
                        "(bitsandbytes nf4): pass --no-load-in-4bit to run it in fp32 on this "
                        "CPU") from None


def hardware() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            # other work on the machine slows the figures down: the 1-minute load at the end
            "load_average_1min": round(os.getloadavg()[0], 2)}


def run_measure(args, p: dict, session: Session) -> dict:
    settings = Settings(prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    figures = measure(session, settings, args.rounds)
    result = {
        "schema_version": 1,
        "timestamp": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "target": str(args.target), "model": p["model"], "adapter": str(p["run_dir"]),
        "device": session.device, "precision": session.precision,
        "load_seconds": round(session.loaded.seconds, 2), "hardware": hardware(),
        "settings": {"prompt": settings.prompt, "max_new_tokens": settings.max_new_tokens,
                     "greedy": settings.greedy, "rounds": args.rounds, "warm_up_rounds": 1},
        **figures,
    }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        try:
            write_json(args.out, result, ensure_ascii=False)
        except OSError as err:
            raise UserError(f"cannot write {args.out} ({err.strerror or err}): pass another "
                            "--out") from None
        print(f"wrote {args.out}")
    return result


def run(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    p = plan(args)
    if not args.measure:
        check_listen(args.host, args.port, what="the page")
    check_device(args, p)
    Settings(prompt=args.prompt, max_new_tokens=args.max_new_tokens).args()  # bad values: 1 line
    session = Session.load(p)
    if args.measure:
        run_measure(args, p, session)
        return
    from app import page

    site = page.build(session, p["run"], str(args.target), args.max_new_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        LOG.warning("listening on %s: the page is reachable from other machines that can reach "
                    "this one", args.host)
    page.launch(site, args.host, args.port)


main = cli(run, prog="app")

if __name__ == "__main__":
    raise SystemExit(main())
