"""python -m export.serve [RUN_DIR]: an OpenAI-compatible server for a run's exported GGUF.

Usage:
    python -m export.serve                          # outputs/smollm2-demo-cpu (make serve)
    python -m export.serve outputs/mistral-qlora    # any run exported with python -m export
    python -m export.serve RUN_DIR [--type q8_0 | --gguf FILE] [--name NAME]
        [--host 127.0.0.1] [--port 8000] [--n-ctx 2048] [-- MORE llama_cpp.server OPTIONS]

It runs llama.cpp's own server, `python -m llama_cpp.server` from the llama-cpp-python that
`make setup-export` compiles, on RUN_DIR/export/NAME-q8_0.gguf (what `make export` writes;
its path is read from RUN_DIR/export/export.json when there), under the model name NAME, the
run directory's name (as the export names its files): the OpenAI routes /v1/completions,
/v1/models (and /v1/chat/completions, but the fine-tuned model is a completion model with no
chat template), on 127.0.0.1:8000 only. The command it runs is printed first; with a GPU build
of llama.cpp every layer goes to the GPU. A missing run, GGUF or llama-cpp-python, or a port in
use, is one line before anything starts. Examples (curl, the openai client): docs/app.md.

llama_cpp.server's sampling defaults are not plain greedy even at temperature 0 (it applies
repeat_penalty 1.1 unless the request says otherwise): send "repeat_penalty": 1.0 for the
argmax continuation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.errors import UserError, cli
from core.launch import shown
from core.ports import check_listen
from core.runs import Run

DEFAULT_RUN = Path("outputs/smollm2-demo-cpu")
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m export.serve", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("run_dir", type=Path, nargs="?", default=DEFAULT_RUN,
                        help=f"run directory exported with python -m export (default {DEFAULT_RUN})")
    parser.add_argument("--type", default="q8_0", help="which exported GGUF (default q8_0)")
    parser.add_argument("--gguf", type=Path, help="serve this GGUF file instead")
    parser.add_argument("--name", help="model name in the API (default: RUN_DIR's name)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]  # after --: more options for python -m llama_cpp.server
    return args


def find_gguf(run_dir: Path, gguf_type: str, name: str) -> Path:
    """RUN_DIR/export's GGUF of that type: the path export.json records, else the file name
    python -m export gives it."""
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found: pass the output_dir of a finished "
                        "run (make demo writes outputs/smollm2-demo-cpu), exported with make "
                        "export")
    run = Run.from_output_dir(run_dir)
    export_dir, summary_file = run.export_dir, run.export_json
    summary, recorded = {}, None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text(encoding="utf-8"))
            recorded = summary["gguf"][gguf_type]["path"]
        except (ValueError, KeyError, TypeError):
            pass
    path = Path(recorded) if recorded and Path(recorded).is_file() else \
        export_dir / f"{name}-{gguf_type}.gguf"
    if not path.is_file():
        types = "" if gguf_type in ("f16", "q8_0") else f" --types f16,{gguf_type}"
        raise UserError(f"{path} not found: export the run first (make export, or python -m "
                        f"export {run_dir}{types})")
    if isinstance(summary, dict) and summary.get("passed") is False:
        print(f"serve: warning: {summary_file} says the llama.cpp check of this export failed; "
              "serving it anyway", file=sys.stderr)
    return path


def server_command(gguf: Path, name: str, host: str, port: int, n_ctx: int,
                   extra: list[str]) -> list[str]:
    """python -m llama_cpp.server with the model, its name, the address and the context."""
    import llama_cpp

    gpu_layers = "-1" if llama_cpp.llama_supports_gpu_offload() else "0"
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--model_alias", name, "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
            "--n_gpu_layers", gpu_layers, "--verbose", "False", *extra]


def check_server_installed() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UserError("llama-cpp-python is not installed (llama.cpp's runtime and its "
                        "server): run `make setup-export`") from None
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as err:
        raise UserError(f"llama.cpp's server needs {err.name or 'its server dependencies'}, "
                        "which is not installed: run `make setup` (pyproject.toml pins the "
                        "server extra's dependencies)") from None


def run(argv=None) -> None:
    args = parse_args(argv)
    name = args.name or args.run_dir.resolve().name
    if args.gguf is not None:
        if not args.gguf.is_file():
            raise UserError(f"--gguf {args.gguf}: file not found: pass a GGUF written by "
                            "python -m export")
        gguf = args.gguf
    else:
        gguf = find_gguf(args.run_dir, args.type, name)
    if args.n_ctx < 1:
        raise UserError(f"--n-ctx {args.n_ctx} must be >= 1")
    check_server_installed()
    check_listen(args.host, args.port, what="the server")
    command = server_command(gguf, name, args.host, args.port, args.n_ctx, args.extra)
    print("serve: $ " + shown(command))
    print(f"serve: OpenAI-compatible API on http://{args.host}:{args.port}/v1, model "
          f'"{name}" ({gguf.name}); Ctrl-C to stop', flush=True)
    # uvicorn inside llama_cpp.server prefers $HOST / $PORT over its own options.
    env = {k: v for k, v in os.environ.items() if k not in ("HOST", "PORT")}
    os.execve(sys.executable, command, env)


main = cli(run, prog="serve")

if __name__ == "__main__":
    raise SystemExit(main())
