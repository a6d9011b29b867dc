"""A multi-turn conversation over one KV cache: each turn prefills only the text it adds.

The checkpoint's chat template renders the whole conversation every turn; the cache already
holds the rendering up to the last answer, so only the rest (the end of that answer, the new
user message, the assistant header) is tokenized and fed. A template that rewrites earlier
turns (some strip reasoning from old answers) breaks the prefix: the turn then starts a fresh
cache from the full rendering, which is slower but still exact.
"""
from __future__ import annotations

import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from flashmoe.engine import Model, TokenEvent, Totals
from flashmoe.errors import ConfigError
from flashmoe.stages.sampling import Sampler

Message = dict[str, str]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: Sequence[Message]) -> str:
    """The template's text for `messages`, ending with the assistant's header."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    # templates write their own BOS / special tokens: add none
    return list(tokenizer.encode(text, add_special_tokens=False))


def chat_ids(tokenizer: Any, user: str, system: str | None = None) -> list[int]:
    """One templated exchange's prompt ids (the one-shot `chat=true prompt=...` path)."""
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    return encode_rendered(tokenizer, render(tokenizer, [*messages, {"role": "user", "content": user}]))


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """What a turn will feed: its conversation, rendering and the new token ids."""

    messages: tuple[Message, ...]
    text: str  # the whole conversation rendered, through the assistant header
    ids: list[int]  # only what the cache lacks
    fresh: bool  # True: start a new cache (first turn, /reset, or the template rewrote history)


@dataclass(frozen=True, slots=True)
class Turn:
    """One answer and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float  # the new prompt tokens' pass plus the first sample
    decode_tokens: int
    decode_s: float
    stopped: str  # eos | max_tokens | interrupted
    fresh: bool

    @property
    def tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


class ChatSession:
    """The conversation, the engine Session whose KV cache holds it, and the text it holds."""

    def __init__(self, model: Model, system: str | None = None, context: int | None = None,
                 sampler: Sampler | None = None, totals: Totals | None = None) -> None:
        if not has_chat_template(model.tokenizer):
            raise ConfigError(f"{model.path} has no chat template (tokenizer_config.json "
                              "chat_template), so chat=true cannot format turns; drop chat=true "
                              "and give prompt=TEXT")
        self.model, self.system, self.context = model, system, context
        self.session = model.session(sampler, totals=totals)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages: tuple[Message, ...] = (
            ({"role": "system", "content": self.system},) if self.system is not None else ())
        self.whole = False  # the cache holds exactly fed_text (False: start over next turn)
        self.fed_text = ""  # the rendering the cache holds
        self.position = 0  # tokens in the cache

    def plan(self, user: str, max_tokens: int) -> TurnPlan:
        """The next turn's ids; ConfigError (nothing changed) if it would overflow the context."""
        tok = self.model.tokenizer
        messages = (*self.messages, {"role": "user", "content": user})
        text = render(tok, messages)
        fresh = not self.whole or not text.startswith(self.fed_text)
        ids = encode_rendered(tok, text if fresh else text[len(self.fed_text):])
        used = 0 if fresh else self.position
        if self.context and used + len(ids) + max_tokens > self.context:
            raise ConfigError(
                f"this turn ({len(ids)} tokens) after {used} tokens of conversation plus "
                f"max_tokens={max_tokens} exceeds the model's context of {self.context}; "
                "type /reset to start over, or lower max_tokens")
        return TurnPlan(messages, text, ids, fresh)

    async def reply(self, plan: TurnPlan, max_tokens: int, stop: Sequence[int],
                    on_token: Callable[[TokenEvent], None],
                    interrupted: Callable[[], bool] = lambda: False) -> Turn:
        """Generate the answer, calling on_token for each non-stop token; commit the turn."""
        if plan.fresh:
            self.session.reset()
            self.position = 0
        tokens: list[int] = []
        first_s = last_s = 0.0
        stopped = "max_tokens"
        t0 = time.perf_counter()
        steps = self.session.generate(plan.ids, max_tokens, stop)
        self.whole = False  # until the answer is committed
        async with aclosing(steps):
            async for ev in steps:
                tokens.append(ev.token_id)
                last_s = time.perf_counter() - t0
                first_s = first_s or last_s
                if ev.token_id in stop:
                    stopped = "eos"
                    break
                on_token(ev)
                if interrupted():  # between two steps: the cache is whole
                    stopped = "interrupted"
                    break
        answer = [t for t in tokens if t not in stop]
        self._commit(plan, tokens, answer)
        return Turn(self.model.decode(answer), answer, len(plan.ids), first_s,
                    len(tokens) - 1, last_s - first_s, stopped, plan.fresh)

    def _commit(self, plan: TurnPlan, tokens: list[int], answer: list[int]) -> None:
        fed = tokens[:-1]  # the last sampled token was never fed back
        self.messages = (*plan.messages, {"role": "assistant", "content": self.model.decode(answer)})
        self.fed_text = plan.text + self.model.decode(fed)
        self.position += len(plan.ids) + len(fed)
        self.whole = True
