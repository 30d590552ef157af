"""finercut never runs code that comes with a model, and never asks whether to.

transformers asks "Do you wish to run the custom code? [y/N]" on a terminal when a folder's config has an
``auto_map`` and ``trust_remote_code`` is left unset; without a terminal it raises instead. So these tests run the
command line and the loaders in a subprocess on a pseudo-terminal, answer "y" to any prompt, and check that none
appeared and that the folder's code (which writes a marker file when imported) never ran.
"""

from __future__ import annotations

import ast
import json
import os
import pty
import select
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

import finercut
from conftest import save_tiny_model, write_word_text
from finercut.adapters import supported_model_types

SRC = Path(finercut.__file__).resolve().parents[1]
PROMPT = "[y/N]"
NO_CODE = "finercut does not run code that comes with a model"


# ---------------------------------------------------------------------------------------------------------------------
# Folders whose code announces itself


def marker_line(marker: Path) -> str:
    """A line of Python that records, in ``marker``, that the module holding it was imported."""
    return f"import pathlib; pathlib.Path({str(marker)!r}).open('a').write(__name__ + '\\n')\n"


CONFIG_CODE = (
    "from transformers import LlamaConfig\n\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
)
MODEL_CODE = (
    "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
    "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
)
TOKENIZER_CODE = (
    "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def with_model_code(folder: Path, marker: Path, *, model_type: str) -> Path:
    """Give the model folder an ``auto_map`` to its own config and model classes, and that code."""
    edit_json(folder / "config.json", model_type=model_type, architectures=["EvilForCausalLM"],
              auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "configuration_evil.py").write_text(marker_line(marker) + CONFIG_CODE)
    (folder / "modeling_evil.py").write_text(marker_line(marker) + MODEL_CODE)
    return folder


def with_tokenizer_code(folder: Path, marker: Path) -> Path:
    """Give the folder a tokenizer class only its own code defines."""
    edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
              auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenization_evil.py").write_text(marker_line(marker) + TOKENIZER_CODE)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``evil``: unknown model type and tokenizer class, both only in the folder's code; ``llama_code``: a known
    model type whose auto_map points at code too; ``tokenizer_code``: a plain model with a code-only tokenizer;
    ``pruned``: a finercut pruned folder whose modeling_finercut.py also writes the marker."""
    from finercut.checkpoint import MODELING_FILE, apply_removal, save_pruned
    from finercut.candidates import Unit
    from tiny_models import tiny_model

    from conftest import word_tokenizer

    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "code-ran.txt"
    plain = save_tiny_model(root / "plain")
    made = {"marker": marker, "text": write_word_text(root / "text.txt"), "root": root}
    for name in ("evil", "llama_code", "tokenizer_code"):
        made[name] = Path(shutil.copytree(plain, root / name))
    with_tokenizer_code(with_model_code(made["evil"], marker, model_type="evil_llama"), marker)
    with_model_code(made["llama_code"], marker, model_type="llama")
    with_tokenizer_code(made["tokenizer_code"], marker)
    made["pruned"] = root / "pruned"
    save_pruned(apply_removal(tiny_model("llama"), [Unit(1, "attention")]), made["pruned"], tokenizer=word_tokenizer())
    modeling = made["pruned"] / MODELING_FILE
    modeling.write_text(marker_line(marker) + modeling.read_text())
    return made


# ---------------------------------------------------------------------------------------------------------------------
# A subprocess on a terminal


def run_on_terminal(argv: list[str], *, cwd: Path, timeout: float = 240.0) -> tuple[int, str, int]:
    """Run ``argv`` with a pseudo-terminal as stdin, stdout and stderr; answer "y" to every [y/N] prompt.

    Returns:
        ``(exit code, everything the terminal showed, number of prompts answered)``.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent),
                                                         os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"),
           "TERM": "dumb", "COLUMNS": "400"}
    pid, terminal = pty.fork()
    if pid == 0:  # the child: its standard streams are the terminal
        try:
            os.chdir(cwd)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    shown, answered, scanned, finished = b"", 0, 0, False
    deadline = time.monotonic() + timeout
    try:
        while True:
            if not select.select([terminal], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError(f"{argv} still running after {timeout} s; it showed: {shown!r}")
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if PROMPT.encode() in shown[scanned:]:
                os.write(terminal, b"y\n")
                answered += 1
                scanned = len(shown)
        finished = True
    finally:
        if not finished:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace").replace("\r\n", "\n"), answered


def python_on_terminal(script: str, cwd: Path) -> tuple[int, str, int]:
    return run_on_terminal([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd)


def finercut_on_terminal(args: list[str], cwd: Path) -> tuple[int, str, int]:
    return run_on_terminal([sys.executable, "-m", "finercut.cli", *args], cwd=cwd)


@pytest.fixture
def no_marker(folders):
    folders["marker"].unlink(missing_ok=True)
    yield folders["marker"]
    assert not folders["marker"].exists(), f"the folder's own code ran: {folders['marker'].read_text()}"


# ---------------------------------------------------------------------------------------------------------------------
# The harness sees what a user sees


def test_the_terminal_shows_transformers_prompt_and_y_runs_the_folders_code(folders, tmp_path):
    # What finercut used to do: a load with trust_remote_code unset. Proves the fixture's code runs when allowed and
    # that the harness sees and answers the prompt, so the tests below can fail.
    folders["marker"].unlink(missing_ok=True)
    code, shown, answered = python_on_terminal(f"""
        from transformers import AutoConfig
        print(type(AutoConfig.from_pretrained({str(folders['evil'])!r})).__name__)
    """, tmp_path)
    assert answered == 1 and PROMPT in shown
    assert code == 0, shown
    assert shown.strip().endswith("EvilConfig")
    imported = folders["marker"].read_text().splitlines()
    assert len(imported) == 1 and imported[0].startswith("transformers_modules.evil")
    assert imported[0].endswith(".configuration_evil")
    folders["marker"].unlink()


def test_plain_transformers_loads_a_pruned_folders_tokenizer_without_a_prompt(folders, no_marker, tmp_path):
    # What a user of the saved model types first. The model itself needs trust_remote_code (or load_pruned); the
    # dense class refuses for want of model.safetensors instead of filling the removed sub-layers at random.
    code, shown, answered = python_on_terminal(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained({str(folders['pruned'])!r})
        print("tokens:", tokenizer("hello world")["input_ids"])
        try:
            AutoModelForCausalLM.from_pretrained({str(folders['pruned'])!r})
        except OSError as error:
            print("model:", error)
    """, tmp_path)
    assert (code, answered) == (0, 0) and PROMPT not in shown, shown
    lines = shown.strip().splitlines()
    assert lines[0].startswith("tokens: [") and len(lines) == 2, shown  # nothing else: no warning
    assert lines[1].startswith("model: Error no file named model.safetensors"), shown


# ---------------------------------------------------------------------------------------------------------------------
# The command line: refused in one line, exit code 2, no prompt, no code run, nothing written


def assert_one_line_refusal(code: int, shown: str, answered: int, command: str) -> str:
    assert answered == 0 and PROMPT not in shown, shown
    assert code == 2, shown
    lines = shown.strip().splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith(f"finercut {command}: error: cannot load ")
    return lines[0]


def test_prune_refuses_a_folder_that_needs_its_own_code(folders, no_marker, tmp_path):
    output = tmp_path / "run"
    shown = finercut_on_terminal(["prune", "--model", str(folders["evil"]), "--calibration", str(folders["text"]),
                                  "--samples", "2", "--seq-len", "8", "--threads", "1", "--no-progress",
                                  "--output", str(output)], tmp_path)
    line = assert_one_line_refusal(*shown, "prune")
    assert (f"{folders['evil']}: its config.json has model type 'evil_llama', which transformers does not know, and "
            f"an auto_map to the model's own code (configuration_evil.py, modeling_evil.py); {NO_CODE}. "
            f"Supported model types: {', '.join(supported_model_types())}") in line
    assert not output.exists()


def test_eval_refuses_a_folder_that_needs_its_own_code(folders, no_marker, tmp_path):
    shown = finercut_on_terminal(["eval", str(folders["evil"]), "--tasks", "", "--ppl-max-windows", "0",
                                  "--wikitext-docs", "0"], tmp_path)
    assert NO_CODE in assert_one_line_refusal(*shown, "eval")


def test_prune_on_a_pruned_folder_says_what_it_is(folders, no_marker, tmp_path):
    shown = finercut_on_terminal(["prune", "--model", str(folders["pruned"]), "--calibration", str(folders["text"]),
                                  "--output", str(tmp_path / "run")], tmp_path)
    line = assert_one_line_refusal(*shown, "prune")
    assert "is a model pruned by finercut (a llama model with sub-layers removed); this needs the dense model" in line


@pytest.mark.slow  # two commands that load lm-eval and write a GGUF; the loaders below cover the same calls
def test_eval_and_export_take_a_pruned_folder_without_consulting_its_code(folders, no_marker, tmp_path):
    code, shown, answered = finercut_on_terminal(["eval", str(folders["pruned"]), "--tasks", "",
                                                  "--ppl-max-windows", "0", "--wikitext-docs", "0"], tmp_path)
    assert (code, answered) == (0, 0), shown
    code, shown, answered = finercut_on_terminal(["export", str(folders["pruned"]), "--format", "gguf",
                                                  "--output", str(tmp_path / "pruned.gguf")], tmp_path)
    assert (code, answered) == (0, 0), shown
    assert (tmp_path / "pruned.gguf").stat().st_size > 0


# ---------------------------------------------------------------------------------------------------------------------
# The library's loaders


LOADERS = """
    import sys
    from finercut.checkpoint import load_pruned, load_pruned_tokenizer, read_pruned_config
    from finercut.export.source import load_source
    from finercut.modelio import RemoteCodeError, load_config, load_model, load_tokenizer, resolve_model_source

    def attempt(name, load):
        try:
            value = load()
        except RemoteCodeError as error:
            print(f"{name}: refused: {error}")
        else:
            print(f"{name}: {type(value).__module__.partition('.')[0]}.{type(value).__name__}")

    *folders, pruned = sys.argv[1:]
    for folder in folders:
        source = resolve_model_source(folder)
        attempt("config", lambda: load_config(source))
        attempt("tokenizer", lambda: load_tokenizer(source))
        attempt("model", lambda: load_model(source, dtype="float32", device="cpu")[0])
    attempt("pruned config", lambda: read_pruned_config(pruned))
    attempt("pruned model", lambda: load_pruned(pruned))
    attempt("pruned tokenizer", lambda: load_pruned_tokenizer(pruned))
    attempt("export source", lambda: load_source(pruned).model)
"""


def test_loaders_refuse_what_needs_code_and_never_run_it_otherwise(folders, no_marker, tmp_path):
    evil, tokenizer_code = str(folders["evil"]), str(folders["tokenizer_code"])
    code, shown, answered = run_on_terminal(
        [sys.executable, "-c", textwrap.dedent(LOADERS),
         *(str(folders[name]) for name in ("evil", "llama_code", "tokenizer_code", "pruned"))], cwd=tmp_path)
    assert (code, answered) == (0, 0), shown
    assert PROMPT not in shown
    results = [line for line in shown.splitlines() if line.startswith(("config: ", "tokenizer: ", "model: ",
                                                                      "pruned ", "export "))]
    assert [line.split(": ", 1)[0] for line in results] == ["config", "tokenizer", "model"] * 3 + [
        "pruned config", "pruned model", "pruned tokenizer", "export source"]
    evil_results, llama_results, tokenizer_results, pruned_results = (results[:3], results[3:6], results[6:9],
                                                                      results[9:])
    model_refusal = (f"refused: cannot load {evil}: its config.json has model type 'evil_llama', which transformers "
                     "does not know")
    assert all(line.split(": ", 1)[1].startswith(model_refusal) for line in evil_results), evil_results
    # A known model type: its auto_map is ignored and transformers' own classes are built.
    assert llama_results == ["config: transformers.LlamaConfig", "tokenizer: transformers.TokenizersBackend",
                             "model: transformers.LlamaForCausalLM"]
    assert tokenizer_results[0] == "config: transformers.LlamaConfig"
    assert tokenizer_results[1].startswith(
        f"tokenizer: refused: cannot load {tokenizer_code}: its tokenizer_config.json names tokenizer class "
        "'EvilTokenizer', which transformers does not have, with an auto_map to the tokenizer's own code "
        f"(tokenization_evil.py); {NO_CODE}")
    assert tokenizer_results[2] == "model: transformers.LlamaForCausalLM"
    # finercut's own classes for its pruned folder, not the folder's copy of them.
    assert pruned_results == ["pruned config: finercut.FinerCutLlamaConfig",
                              "pruned model: finercut.FinerCutLlamaForCausalLM",
                              "pruned tokenizer: transformers.TokenizersBackend",
                              "export source: finercut.FinerCutLlamaForCausalLM"]


def test_a_pruned_folders_code_only_tokenizer_is_refused(folders, tmp_path):
    from finercut.checkpoint import load_pruned_tokenizer
    from finercut.modelio import RemoteCodeError

    folder = Path(shutil.copytree(folders["pruned"], tmp_path / "pruned"))
    with_tokenizer_code(folder, tmp_path / "marker")
    with pytest.raises(RemoteCodeError, match=r"its tokenizer_config.json names tokenizer class 'EvilTokenizer'"):
        load_pruned_tokenizer(folder)
    assert not (tmp_path / "marker").exists()


def test_load_pruned_refuses_a_trust_remote_code_argument(folders):
    from finercut.checkpoint import load_pruned, load_pruned_tokenizer
    from finercut.errors import ConfigError

    for load in (load_pruned, load_pruned_tokenizer):
        with pytest.raises(ConfigError, match="never runs a folder's code; drop the trust_remote_code argument"):
            load(folders["pruned"], trust_remote_code=True)


# ---------------------------------------------------------------------------------------------------------------------
# The rules, on config dicts


def test_model_code_refusal_rule():
    from finercut.modelio import model_code_refusal

    code = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "org/repo--modeling_x.XForCausalLM"}
    assert model_code_refusal({"model_type": "llama"}) is None
    assert model_code_refusal({"model_type": "llama", "auto_map": code}) is None  # transformers' class is built
    assert model_code_refusal({"model_type": "x_model"}) is None  # no code to run: transformers' own error applies
    assert "model type 'x_model', which transformers does not know, and an auto_map to the model's own code " \
           "(configuration_x.py, modeling_x.py)" in model_code_refusal({"model_type": "x_model", "auto_map": code})
    assert "model type None" in model_code_refusal({"auto_map": code})
    for model_type in ("llama", "finercut_llama"):  # finercut's folders before weights variants: finercut_<base>
        assert f"is a model pruned by finercut (a {model_type} model" in model_code_refusal(
            {"model_type": model_type, "auto_map": code, "finercut": {}})


def test_tokenizer_code_refusal_rule():
    from finercut.modelio import tokenizer_code_refusal

    code = {"AutoTokenizer": ["tokenization_x.XTokenizer", "tokenization_x_fast.XTokenizerFast"]}
    assert tokenizer_code_refusal({}) is None
    assert tokenizer_code_refusal({"tokenizer_class": "XTokenizer"}) is None  # no auto_map: nothing to run
    assert tokenizer_code_refusal({"tokenizer_class": "LlamaTokenizer", "auto_map": code}) is None
    assert tokenizer_code_refusal({"tokenizer_class": "PreTrainedTokenizerFast", "auto_map": code}) is None
    assert tokenizer_code_refusal({"auto_map": {"AutoConfig": "configuration_x.XConfig"}}) is None
    refusal = tokenizer_code_refusal({"tokenizer_class": "XTokenizer", "auto_map": code})
    assert "tokenizer class 'XTokenizer', which transformers does not have, with an auto_map to the tokenizer's " \
           "own code (tokenization_x.py, tokenization_x_fast.py)" in refusal
    assert "tokenizer class None" in tokenizer_code_refusal({"auto_map": code})
    # The legacy form: auto_map is the [slow, fast] pair itself.
    assert "(tokenization_x.py)" in tokenizer_code_refusal({"tokenizer_class": "X", "auto_map": [
        "tokenization_x.X", None]})


def test_builtin_task_datasets_load_with_dataset_scripts_refused(monkeypatch):
    # datasets < 4 falls back to this flag when lm-eval loads a built-in task's data without trust_remote_code.
    import datasets.config

    from finercut.evaluation.lm_eval_bridge import load_builtin

    monkeypatch.setattr(datasets.config, "HF_DATASETS_TRUST_REMOTE_CODE", None, raising=False)
    seen = []

    class RecordingTaskManager:
        def load(self, names):
            seen.append(datasets.config.HF_DATASETS_TRUST_REMOTE_CODE)
            return {"tasks": {name: name for name in names}, "groups": {}}

    assert load_builtin(RecordingTaskManager(), ["piqa"]) == ["piqa"]
    assert seen == [False]
    assert datasets.config.HF_DATASETS_TRUST_REMOTE_CODE is None


# ---------------------------------------------------------------------------------------------------------------------
# Static: no loading call in finercut leaves trust_remote_code unset


LOADING_ATTRIBUTES = {"from_pretrained", "from_config", "load_dataset", "load_dataset_builder"}
LOADING_NAMES = {"HFLM", "load_dataset", "load_dataset_builder", "pipeline"}
SCRIPTLESS = {("calibration.py", "load_dataset")}
"""``datasets.load_dataset`` calls: datasets 4 and later (what pyproject.toml requires) have no loading scripts and no
``trust_remote_code`` parameter (it would reach the builder config and fail), so nothing they load runs code."""


def loading_calls(tree: ast.AST):
    """``(call, name, enclosing function name)`` for every call that may consult a model's or dataset's code."""
    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if (isinstance(func, ast.Attribute) and name in LOADING_ATTRIBUTES) or \
                        (isinstance(func, ast.Name) and name in LOADING_NAMES):
                    yield child, name, function
            yield from visit(child, inner)

    yield from visit(tree, None)


def says_no_remote_code(call: ast.Call) -> bool:
    return any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
               for k in call.keywords)


def forwards_an_override(call: ast.Call, name: str, function: str | None) -> bool:
    """``super().from_pretrained(*args, **kwargs)`` inside a class's own ``from_pretrained``: the caller decides."""
    func = call.func
    return (function == name and isinstance(func.value, ast.Call) and getattr(func.value.func, "id", None) == "super")


def test_every_loading_call_in_finercut_says_trust_remote_code_false():
    offenders, pending_seen, checked = [], set(), 0
    for path in sorted((SRC / "finercut").rglob("*.py")):
        for call, name, function in loading_calls(ast.parse(path.read_text(), filename=str(path))):
            checked += 1
            if says_no_remote_code(call) or forwards_an_override(call, name, function):
                continue
            if (path.name, name) in SCRIPTLESS:
                pending_seen.add((path.name, name))
                continue
            offenders.append(f"{path.relative_to(SRC)}:{call.lineno}: {name}(...) without trust_remote_code=False")
    assert not offenders, "\n".join(offenders)
    assert pending_seen == SCRIPTLESS, f"gone since: remove {SCRIPTLESS - pending_seen} from SCRIPTLESS"
    requirements = (SRC.parent / "pyproject.toml").read_text()
    assert '"datasets>=4"' in requirements and "datasets>=2" not in requirements
    assert checked >= 10  # the walk finds the calls (modelio, checkpoint, lm_eval_bridge, ...)


def test_the_static_check_catches_each_form_of_call():
    source = textwrap.dedent("""
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path, trust_remote_code=None)
        AutoConfig.from_pretrained(path, trust_remote_code=True)
        datasets.load_dataset("wikitext")
        load_dataset("wikitext")
        HFLM(pretrained=model)
        AutoModel.from_config(config, **options)
        AutoModel.from_pretrained(path, trust_remote_code=False)
        class Pruned(Base):
            def from_pretrained(cls, *args, **kwargs):
                return super().from_pretrained(*args, **kwargs)
            def load(cls, path):
                return super().from_pretrained(path)
    """)
    calls = list(loading_calls(ast.parse(source)))
    unsafe = [call.lineno for call, name, function in calls
              if not says_no_remote_code(call) and not forwards_an_override(call, name, function)]
    assert unsafe == [2, 3, 4, 5, 6, 7, 8, 14]
