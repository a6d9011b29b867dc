"""`chat=true` on a terminal: a multi-turn chat, answers streamed, per-turn tok/s on stderr.

/reset forgets the conversation, /quit (or Ctrl-D) leaves, Ctrl-C stops the answer being
written and returns to the prompt; a line ending in a backslash continues on the next one.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from omegaconf import DictConfig

from flashmoe.chat import ChatSession, Turn, TurnPlan
from flashmoe.engine import Engine, TokenEvent
from flashmoe.errors import ConfigError
from flashmoe.stages.sampling import Sampler
from flashmoe.tasks.common import max_context, run_summary

PROMPT, MORE = "> ", ". "
HELP = ("chat: type a message and press Enter (end a line with \\ to continue it); /reset "
        "clears the conversation, /quit or Ctrl-D exits, Ctrl-C stops an answer")


async def chat(cfg: DictConfig, engine: Engine, sampler: Sampler, log: Any) -> dict:
    """The read-answer loop; returns the run summary when the person leaves."""
    session = ChatSession(engine, cfg.system, max_context(engine), sampler, engine.totals)
    stop = list(engine.tokenizer.eos_token_ids or ())
    _enable_line_editing()
    print(f"flashmoe {HELP}", file=sys.stderr)
    log.info("chat_started", model_path=str(engine.path), max_tokens=cfg.max_tokens)
    keys = CtrlC()
    previous = signal.signal(signal.SIGINT, keys)
    try:
        await _loop(cfg, session, stop, keys, log)
    finally:
        signal.signal(signal.SIGINT, previous)
    return run_summary(cfg, engine, engine.totals, "ok")


async def _loop(cfg: DictConfig, session: ChatSession, stop: list[int], keys: CtrlC,
                log: Any) -> None:
    while (line := read_message(keys)) is not None:
        command = line.strip()
        if command in ("/quit", "/exit", "/bye"):
            break
        if command == "/reset":
            session.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"[unknown command {command}; commands: /reset, /quit]", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            plan = session.plan(line, cfg.max_tokens)
        except ConfigError as e:
            print(f"flashmoe: {e}", file=sys.stderr)
            continue
        turn = await _answer(session, plan, cfg.max_tokens, stop, keys, log)
        log.info("chat_turn_finished", prompt_token_ids=plan.ids, prompt_tokens=turn.prompt_tokens,
                 generated_tokens=len(turn.token_ids), stopped=turn.stopped,
                 fresh_cache=turn.fresh, ttft_s=round(turn.prefill_s, 4),
                 tok_s=round(turn.tok_s, 3), position=session.position)
        print(_turn_line(turn, cfg.max_tokens), file=sys.stderr)


async def _answer(session: ChatSession, plan: TurnPlan, max_tokens: int, stop: list[int],
                  keys: CtrlC, log: Any) -> Turn:
    """Stream one answer to stdout; Ctrl-C sets a flag the loop reads between tokens (a step
    stopped halfway through the layers would leave the cache inconsistent)."""
    detok = session.model.tokenizer.detokenizer
    detok.reset()
    start = 0 if plan.fresh else session.position

    def on_token(ev: TokenEvent) -> None:
        log.info("token_sampled", **{**ev.stats, "token_id": ev.token_id,
                                     "position": start + ev.position})
        detok.add_token(ev.token_id)
        sys.stdout.write(detok.last_segment)
        sys.stdout.flush()

    turn = await session.reply(plan, max_tokens, stop, on_token, keys.pressed.is_set)
    detok.finalize()
    sys.stdout.write(detok.last_segment + "\n")
    sys.stdout.flush()
    return turn


def _turn_line(turn: Turn, max_tokens: int) -> str:
    """`[12 tokens, 8.31 tok/s | prompt +21 tokens, first token 0.41 s]` (stderr)."""
    why = {"interrupted": "; stopped (Ctrl-C)",
           "max_tokens": f"; cut at max_tokens={max_tokens}"}.get(turn.stopped, "")
    n = len(turn.token_ids)
    rate = f", {turn.tok_s:.2f} tok/s" if turn.decode_tokens > 0 else ""
    prompt = f"{turn.prompt_tokens} tokens (new cache)" if turn.fresh else f"+{turn.prompt_tokens} tokens"
    return (f"[{n} token{'s' if n != 1 else ''}{rate} | prompt {prompt}, "
            f"first token {turn.prefill_s:.2f} s{why}]")


class CtrlC:
    """The chat's SIGINT handler: while the person types it raises (the line is dropped),
    otherwise it only flags the answer to stop. SIGTERM stays KeyboardInterrupt: it ends the run."""

    def __init__(self) -> None:
        self.typing = False
        self.pressed = threading.Event()

    def __call__(self, signum: int, frame: Any) -> None:
        if self.typing:
            raise _DropLine
        self.pressed.set()  # after Enter: stops the answer at its first token


class _DropLine(Exception):
    pass


def read_message(keys: CtrlC) -> str | None:
    """One message from the terminal (None on Ctrl-D). Blocks the event loop on purpose:
    nothing else runs while the person types, and only the main thread sees Ctrl-C."""
    keys.pressed.clear()  # the last answer's Ctrl-C is spent
    lines: list[str] = []
    while True:
        try:
            keys.typing = True
            line = input(MORE if lines else PROMPT)
        except _DropLine:
            print(file=sys.stdout)
            lines = []
            continue
        except EOFError:
            print(file=sys.stdout)
            return None
        finally:
            keys.typing = False
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        return "\n".join([*lines, line])


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401 - input() then edits lines and keeps history
    except ImportError:  # not on every platform
        pass
