"""core/: the bottom layer (errors, atomic writes, JSONL, the run definition, checkpoints)."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import yaml

from core.errors import EXIT_USER_ERROR, UserError, cli, reported
from core.files import (
    append_jsonl,
    read_jsonl,
    read_text_rows,
    staged_dir,
    write_file,
    write_files,
)
from core.runs import (
    DEFAULT_EVAL_DATA,
    DEFAULT_TRAIN_DATA,
    Run,
    checkpoints,
    load_recipe,
    newest_complete_checkpoint,
    newest_trainer_state,
    write_recipe,
)

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"bench", "core", "data_prep", "demo", "docker", "eval", "export",
                    "integrations", "models", "recipes", "tests"}


def test_core_imports_nothing_of_the_project():
    for path in (REPO / "core").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in PROJECT_PACKAGES - {"core"}, f"{path.name} imports {name}"


# -- errors ----------------------------------------------------------------------------------


def test_cli_reports_a_user_error_as_one_line_and_status_2(capsys):
    def run(argv):
        if argv == ["bad"]:
            raise UserError("x.csv: file not found; check the --csv path")
        return 0 if argv is None else len(argv)

    main = cli(run, prog="data_prep")
    assert main(["bad"]) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == (
        "data_prep: error: x.csv: file not found; check the --csv path\n")
    assert main(["a", "b"]) == 2 and main(None) == 0
    assert cli(lambda argv: None)() == 0
    assert cli(lambda argv: (_ for _ in ()).throw(UserError("one\ntwo")))() == 2
    assert capsys.readouterr().err == "error: one\nerror: two\n"


def test_a_user_error_is_a_system_exit_with_status_2_and_its_message():
    err = UserError("--variants: unknown nope")
    assert isinstance(err, SystemExit) and err.code == 2
    assert str(err) == err.message == "--variants: unknown nope"


def test_reported_prints_the_line_and_exits_2_inside_a_host_program(capsys):
    with pytest.raises(SystemExit) as exc, reported(newline=True):
        raise UserError("loss became nan at step 3")
    assert exc.value.code == 2 and str(exc.value) == "loss became nan at step 3"
    assert capsys.readouterr().err == "\nerror: loss became nan at step 3\n"
    with pytest.raises(ValueError), reported():  # anything else keeps its traceback
        raise ValueError("not ours")


# -- files -----------------------------------------------------------------------------------


def test_write_files_is_all_or_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_files(out, {"a.json": "{}\n", "b.md": b"# b\n"})
    assert (out / "a.json").read_text() == "{}\n" and (out / "b.md").read_bytes() == b"# b\n"
    assert oct((out / "a.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    real_replace, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="No space left"):
        write_files(out, {"a.json": "new\n", "b.md": "new\n"})
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.md"]  # no temp files
    assert (out / "b.md").read_bytes() == b"# b\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_file_into_a_path_that_is_a_file_fails_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    with pytest.raises(OSError):
        write_file(blocker / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_staged_dir_replaces_the_folder_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "prepared"
    with staged_dir(target) as staging:
        (staging / "train.jsonl").write_text("one\n")
    assert (target / "train.jsonl").read_text() == "one\n"
    with pytest.raises(RuntimeError), staged_dir(target) as staging:
        (staging / "train.jsonl").write_text("half\n")
        raise RuntimeError("disk full")
    assert (target / "train.jsonl").read_text() == "one\n"
    with staged_dir(target) as staging:
        (staging / "eval.jsonl").write_text("two\n")
    assert sorted(p.name for p in target.iterdir()) == ["eval.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no staging left


def test_jsonl_reading_names_the_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n[1]\n{"cut": \n')
    with pytest.raises(UserError, match=r"rows.jsonl line 4: a JSON list, not an object"):
        read_jsonl(path)
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"cut": \n')
    with pytest.raises(UserError, match=r"rows.jsonl line 4: not valid JSON \(Expecting value\)"):
        read_jsonl(path)
    assert read_jsonl(path, skip_bad_lines=True) == [{"text": "a"}, {"text": "b"}]
    append_jsonl(tmp_path / "new" / "log.jsonl", {"step": 1})
    append_jsonl(tmp_path / "new" / "log.jsonl", {"step": 2})
    assert read_jsonl(tmp_path / "new" / "log.jsonl") == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize(("line", "message"), [
    ('{"body": "x"}', 'line 2: no "text" key (found: body): each line must be one JSON object '
                      'like {"text": "..."}'),
    ('{"text": 3}', 'line 2: "text" is int, not a string'),
    ('{"text": "  "}', 'line 2: "text" is empty: remove the line or regenerate the file'),
    ('["x"]', 'line 2: no "text" key (found: list)'),
])
def test_text_rows_of_a_completion_dataset(tmp_path, line, message):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError) as exc:
        read_text_rows(path)
    assert str(exc.value).startswith(f"{path} {message}")
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text_rows(path) == ["one", "two"]


# -- runs ------------------------------------------------------------------------------------


def test_a_run_is_read_from_its_recipe(tmp_path):
    recipe = write_recipe(REPO / "recipes" / "tiny-mistral-cpu.yml", tmp_path / "r.yml",
                          {"output_dir": str(tmp_path / "out"), "load_in_4bit": True,
                           "special_tokens": {"eos_token": "</s>"}, "eval_steps": None})
    run = Run.from_recipe(recipe)
    assert run.recipe == recipe and run.output_dir == tmp_path / "out"
    assert run.base_model == "./models/tiny-mistral"
    assert run.train_data == Path("./data/prepared/clean/train.jsonl")
    assert run.eval_data == Path("./data/prepared/clean/eval.jsonl")
    assert run.load_in_4bit and (run.eos_token, run.pad_token) == ("</s>", "</s>")
    assert "eval_steps" not in run.config  # None deletes a key
    assert run.eval_dir == tmp_path / "out" / "eval"
    assert run.evaluation_json == tmp_path / "out" / "eval" / "evaluation.json"
    assert run.report_md == tmp_path / "out" / "report.md"
    assert not run.has_adapter()
    bare = Run.from_output_dir(tmp_path / "out")
    assert (bare.base_model, bare.train_data, bare.eval_data) == (
        None, DEFAULT_TRAIN_DATA, DEFAULT_EVAL_DATA)


def test_write_recipe_with_a_header_and_nested_overrides(tmp_path):
    target = write_recipe({"a": {"x": 1, "y": 2}, "b": [1]}, tmp_path / "r.yml",
                          {"a": {"y": None, "z": 3}, "b": [2]}, header="made by a test")
    text = target.read_text()
    assert text.startswith("# made by a test\n")
    assert yaml.safe_load(text) == {"a": {"x": 1, "z": 3}, "b": [2]}


@pytest.mark.parametrize(("content", "message"), [
    (None, "recipe file not found"),
    ("a: 1\n  b: 2\n", "not valid YAML at line 2; fix the indentation/quoting there"),
    ("- a\n", "expected a mapping of Axolotl options, got list"),
])
def test_load_recipe_errors_are_one_line(tmp_path, content, message):
    path = tmp_path / "r.yml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as exc:
        load_recipe(path)
    assert str(exc.value) == f"{path}: {message}"


def _checkpoint(root: Path, step: int, state) -> None:
    (root / f"checkpoint-{step}").mkdir(parents=True)
    if state is not None:
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(
            state if isinstance(state, str) else json.dumps(state))


def test_checkpoints_truncated_states_and_the_newest_log(tmp_path):
    log = [{"step": 1, "loss": 3.0, "tokens/trainable": 100}]
    _checkpoint(tmp_path, 2, {"global_step": 2, "log_history": log})
    _checkpoint(tmp_path, 10, {"global_step": 10, "log_history": [
        *log, {"step": 10, "loss": 2.0, "tokens/trainable": 900}]})
    _checkpoint(tmp_path, 11, None)  # killed before trainer_state.json
    _checkpoint(tmp_path, 12, '{"global_step": 12, "log_hi')  # killed while writing it
    (tmp_path / "checkpoint-final").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == [
        "checkpoint-2", "checkpoint-10", "checkpoint-11", "checkpoint-12"]
    assert newest_complete_checkpoint(tmp_path) == (
        tmp_path / "checkpoint-10", [tmp_path / "checkpoint-11", tmp_path / "checkpoint-12"])
    path, state = newest_trainer_state(tmp_path)
    assert path == tmp_path / "checkpoint-10" / "trainer_state.json"
    assert Run.from_output_dir(tmp_path).tokens_trained() == 900
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 10,
                                                              "log_history": []}))
    assert newest_trainer_state(tmp_path)[0] == tmp_path / "trainer_state.json"  # wins the tie
    assert Run.from_output_dir(tmp_path).tokens_trained() == 900  # falls back to a checkpoint
    assert newest_trainer_state(tmp_path / "nothing") is None
    assert Run.from_output_dir(tmp_path / "nothing").tokens_trained() is None


def test_staged_dir_can_keep_a_folder_another_process_made(tmp_path):
    target = tmp_path / "cache"
    with staged_dir(target, keep_existing=True) as staging:
        (staging / "tokenizer.model").write_text("first")
        target.mkdir()  # another process finished first
        (target / "tokenizer.model").write_text("theirs")
    assert (target / "tokenizer.model").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_shown_command_names_no_folder_of_this_machine(tmp_path):
    import sys

    from core.launch import CODE_ROOT, bin_dir, shown

    argv = [sys.executable, "-m", "bench.unsloth_peer", "--train-jsonl",
            str(CODE_ROOT / "data" / "prepared" / "clean" / "train.jsonl"), "--out",
            str(tmp_path / "a b")]
    assert shown(argv) == ("python -m bench.unsloth_peer --train-jsonl "
                           f"data/prepared/clean/train.jsonl --out '{tmp_path / 'a b'}'")
    assert shown([str(bin_dir() / "axolotl"), "train", "recipes/x.yml"]) == \
        "axolotl train recipes/x.yml"


def test_launched_commands_allocate_gpu_memory_as_the_axolotl_command_does(monkeypatch):
    """`python -m axolotl.cli.train` (the bench, gpu-check) skips the allocator setting the
    `axolotl` command makes for every verb; the launch environment supplies it."""
    from axolotl.utils import set_pytorch_cuda_alloc_conf

    from core.launch import ALLOC_VARIABLES, environment

    for name in ALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    set_pytorch_cuda_alloc_conf()  # what axolotl.cli.main does before any verb
    by_axolotl = {name: os.environ.get(name) for name in ALLOC_VARIABLES}
    assert any(by_axolotl.values())
    launched = environment(base={})
    assert {name: launched.get(name) for name in ALLOC_VARIABLES} == by_axolotl
    # a user's own setting wins, under either name
    assert environment(base={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}).get(
        "PYTORCH_ALLOC_CONF") is None
    assert environment(base={"PYTORCH_ALLOC_CONF": "backend:native"})["PYTORCH_ALLOC_CONF"] == \
        "backend:native"
    # a program that is not Axolotl's (the bench's peers) gets none
    assert not set(ALLOC_VARIABLES) & set(environment(base={}, axolotl_allocator=False))
