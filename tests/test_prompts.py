"""Any text is a prompt: argv -> Hydra overrides -> config -> tokenizer, exactly as typed.

The conversion and composition are checked in-process for every prompt (fast); the same
prompts then go through the real `python -m flashmoe` entry (forked from one warm interpreter,
see tests/test_reliability.serve_cli) and the token ids the engine received, recorded in the
run log, must equal the tokenizer's encoding of the very same string.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.conftest import error_lines

from flashmoe.argv import free_text_key, hydra_quote, to_overrides
from flashmoe.cli import _variants
from flashmoe.config import DEFAULT_PROMPT, compose_config
from flashmoe.errors import ConfigError
from flashmoe.prompts import resolve_prompt
from tests.test_reliability import run_cli_cases

PROMPTS = [
    "Hello, world",
    "What's the capital of France?",
    'She said "hi" and left.',
    "It's 5 o'clock: time for tea, isn't it?",
    "key=value pairs: a=1, b=2",
    "def f(x): return {'a': [x, x**2]}",
    "for (int i = 0; i < n; i++) { sum += a[i]; }",
    "SELECT * FROM users WHERE name = 'O''Brien';",
    '{"role": "user", "content": "hi"}',
    "Line one\nLine two\n\nLine four",
    "  leading and trailing spaces  ",
    "Tab\tseparated\tvalues",
    "日本の首都はどこですか？",
    "Какая столица Франции?",
    "ما هي عاصمة فرنسا؟",
    "नमस्ते, आप कैसे हैं?",
    "Ελληνικά: Ποια είναι η πρωτεύουσα;",
    "한국어 텍스트, with English",
    "Emoji 🎉🚀 — does it work? 👍🏽",
    "Price: $5, or ${HOME} literally, or ${oc.env:HOME}",
    "\\${escaped} and \\\\${twice}",
    "Backslash \\ and \\n are not newlines",
    "C:\\Users\\me\\file.txt",
    "Trailing backslash \\",
    "a'b\"c\\'d\\\"e",
    "a,b,c",
    "[1, 2, 3]",
    "(parenthesised), [bracketed], {braced}",
    "100% sure? #tag @user & amp | pipe ~tilde ^caret *star",
    "x = y + z; if x > 0: print('positive')",
    '"Double-quoted whole"',
    "'single-quoted whole'",
    "Markdown **bold** _italic_ `code`",
    "=leading equals",
    ":leading colon",
    "?!.,;:",
    "null",
    "42",
    "true",
    "-- not a flag",
]


def test_other_free_text_keys_and_prefixes():
    args = to_overrides(["model.path=/my models/Qwen, 4-bit", "data=it's.txt",
                         "++system=Be brief: yes", "task=ppl", "io.split=1,2,4"])
    assert args[3:] == ["task=ppl", "io.split=1,2,4"]  # group choices and sweeps untouched
    cfg = compose_config(args[:3] + ["task=ppl"])
    assert (cfg.model.path, cfg.data, cfg.system) == ("/my models/Qwen, 4-bit", "it's.txt",
                                                      "Be brief: yes")
    assert free_text_key("prompt_file=x") == "prompt_file" and free_text_key("io.split=1") is None


def test_sweeps_over_other_keys_keep_working():
    variants = _variants(to_overrides(["io.split=1,2,4", "prompt=a, b"]))
    cfgs = [compose_config(v) for v in variants]
    assert [(c.io.split, c.prompt) for c in cfgs] == [(1, "a, b"), (2, "a, b"), (4, "a, b")]


def test_quoting_is_hydras_own():
    assert hydra_quote("What's up") == "'What\\'s up'"
    assert hydra_quote("plain") == "'plain'"


# ---- where the prompt comes from --------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _cfg(*overrides: str):
    return compose_config(["hardware=linux_cpu", *to_overrides(overrides)])


def test_prompt_sources(tmp_path):
    piped = io.StringIO("from a pipe, with 'quotes'\n")
    assert resolve_prompt(_cfg("prompt=typed"), piped).text == "typed"
    assert resolve_prompt(_cfg("prompt=-"), io.StringIO("dash\n\n")).text == "dash\n"  # one \n
    src = resolve_prompt(_cfg(), piped)
    assert (src.text, src.origin) == ("from a pipe, with 'quotes'", "stdin")
    assert resolve_prompt(_cfg(), io.StringIO("")).text == DEFAULT_PROMPT  # < /dev/null
    assert resolve_prompt(_cfg(), Terminal()).text == DEFAULT_PROMPT
    closed = io.StringIO()
    closed.close()  # `<&-`, or a runner's stdin that refuses reads
    assert resolve_prompt(_cfg(), closed).text == DEFAULT_PROMPT
    with pytest.raises(ConfigError, match="prompt=- but standard input is closed"):
        resolve_prompt(_cfg("prompt=-"), closed)
    latin1 = io.TextIOWrapper(io.BytesIO("café".encode("latin-1")))
    with pytest.raises(ConfigError, match="standard input is not UTF-8"):
        resolve_prompt(_cfg(), latin1)
    chat = resolve_prompt(_cfg("chat=true"), Terminal())
    assert (chat.text, chat.origin) == (None, "terminal")  # the interactive chat
    assert resolve_prompt(_cfg("chat=true", "prompt=hi"), Terminal()).text == "hi"
    f = tmp_path / "q, 1.txt"
    f.write_text("Über {braces}\r\n", encoding="utf-8")
    assert resolve_prompt(_cfg(f"prompt_file={f}"), Terminal()).text == "Über {braces}"


@pytest.mark.parametrize("setup,needle", [
    (lambda d: ["prompt=a", f"prompt_file={d}/q.txt"], "both set"),
    (lambda d: [f"prompt_file={d}/missing.txt"], "does not exist"),
    (lambda d: [f"prompt_file={d}"], "is a directory"),
    (lambda d: [f"prompt_file={d}/latin1.txt"], "is not UTF-8"),
])
def test_prompt_source_errors(tmp_path, setup, needle):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ConfigError, match=needle):
        resolve_prompt(_cfg(*setup(tmp_path)), Terminal())


# ---- to the engine ---------------------------------------------------------------------------
class Events:
    """A stand-in for the run log: keeps every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw) -> None:
        self.events.append((event, kw))

    warning = info


async def test_thirty_plus_prompts_reach_the_engine_exactly(tiny, monkeypatch):
    """argv -> overrides -> Hydra -> task=generate -> Engine.generate, for every prompt: the ids
    the engine receives are the tokenizer's encoding of the exact string (one warm engine)."""
    import flashmoe.tasks.generate as generate
    from flashmoe.tasks.common import open_engine

    path = tiny("qwen3_5_moe")
    base = [f"model.path={path}", "hardware=linux_cpu", "max_tokens=1"]
    engine = await open_engine(compose_config(base))
    received: list[list[int]] = []
    real_generate = engine.generate

    def recording(prompt, *args, **kw):
        received.append(list(prompt))
        return real_generate(prompt, *args, **kw)

    monkeypatch.setattr(engine, "generate", recording)

    async def shared(cfg, **_):
        return engine

    monkeypatch.setattr(generate, "open_engine", shared)
    try:
        assert len(PROMPTS) >= 30
        for text in PROMPTS:
            cfg = compose_config(to_overrides([f"prompt={text}", *base]))
            log = Events()
            await generate.run(cfg, log, {})
            assert received[-1] == engine.tokenizer.encode(text), text
            assert engine.decode(received[-1]) == text  # and they spell the text back
            started = dict(log.events)["generation_started"]
            assert started["prompt_token_ids"] == received[-1]  # the run log records them
    finally:
        await engine.aclose()
    assert len(received) == len(PROMPTS)


# ---- through the real entry point ---------------------------------------------------------------
E2E_PROMPTS = ["Hello, world", "What's the capital of France?", "Line one\nLine two",
               "def f(x): return {'a': [x, x**2]}", "日本語 and emoji 🎉, ${HOME}: ok", "a,b,c"]
ERRORS = {  # argv -> what the one line must say
    "run_dir": (["hydra.run.dir=/dev/null/run"], "cannot write /dev/null/run"),
    "hydra_group": (["hydra/launcher=nope"], "hydra/launcher=nope is not an option"),
    "grammar": (["io.split=[1,2"], "quote the value"),
    "positional": (["Hello, world"], "'prompt=Hello, world'"),
    "flag": (["--nope"], "unrecognized arguments: --nope"),
    "prompt_file": (["prompt_file=/no/such/file.txt"], "prompt_file=/no/such/file.txt does not"),
}


@pytest.fixture(scope="module")
def cli_runs(tiny, tmp_path_factory):
    """Every case of this section in one batch: name -> (exit code, stdout, stderr, run dir)."""
    root, path = tmp_path_factory.mktemp("prompts"), tiny("qwen3_5_moe")
    common = [f"model.path={path}", "hardware=linux_cpu", "max_tokens=1", "hydra.run.dir=run"]
    cases = {f"p{i}": ([f"prompt={text}", *common], None) for i, text in enumerate(E2E_PROMPTS)}
    (root / "question.txt").write_text("Piped, with 'quotes' and {braces}: ok?\n", encoding="utf-8")
    cases["piped"] = (common, root / "question.txt")
    cases["dash"] = (["prompt=-", *common], root / "question.txt")
    cases["file"] = ([f"prompt_file={root / 'question.txt'}", *common], None)
    cases["chat"] = (["chat=true", "system=Be brief, please.", "prompt=What's 2+2?", *common], None)
    for name, (args, _) in ERRORS.items():  # the case's own run dir, not the common one
        cases[name] = ([*common[:-1], *args] if name == "run_dir" else [*common, *args], None)
    jobs = []
    for name, (args, stdin) in cases.items():
        (root / name).mkdir()
        jobs.append({"cwd": str(root / name), "args": args,
                     **({"stdin": str(stdin)} if stdin else {})})
    codes = run_cli_cases(jobs)
    return {name: (code, (root / name / "stdout").read_text(), (root / name / "stderr").read_text(),
                   root / name / "run") for name, code in zip(cases, codes)}


def _received(run: Path) -> tuple[list[int], str]:
    for line in (run / "flashmoe.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "generation_started":
            return event["prompt_token_ids"], event["prompt_origin"]
    raise AssertionError("no generation_started event")


def test_prompts_through_the_cli_reach_the_engine_exactly(cli_runs, tiny):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny("qwen3_5_moe"))
    for i, text in enumerate(E2E_PROMPTS):
        code, out, err, run = cli_runs[f"p{i}"]
        assert code == 0 and out.endswith("\n"), (text, err)
        assert _received(run) == (tok.encode(text), "prompt"), text


def test_stdin_file_and_chat_prompts_reach_the_engine_exactly(cli_runs, tiny):
    from mlx_lm.utils import load_tokenizer

    from flashmoe.chat import chat_ids

    tok = load_tokenizer(tiny("qwen3_5_moe"))
    question = "Piped, with 'quotes' and {braces}: ok?"
    for name, origin in (("piped", "stdin"), ("dash", "stdin"), ("file", "prompt_file")):
        code, _, err, run = cli_runs[name]
        assert code == 0, err
        assert _received(run) == (tok.encode(question), origin), name
    code, _, err, run = cli_runs["chat"]
    assert code == 0, err
    ids, _ = _received(run)
    assert ids == chat_ids(tok, "What's 2+2?", "Be brief, please.")
    assert "<|im_start|>system\nBe brief, please.<|im_end|>" in tok.decode(ids)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_failures_before_the_first_token_are_one_line(cli_runs, name):
    code, out, err, _ = cli_runs[name]
    lines = error_lines(err)
    assert code != 0 and out == "" and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("flashmoe: "), lines
    assert ERRORS[name][1] in lines[0], lines[0]
