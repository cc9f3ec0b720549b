"""OpenAI response bodies and stream chunks from the engine's cumulative RequestOutputs."""
from __future__ import annotations

from . import protocol as P
from .streams import ChoiceState
from .tools.parsers import parse_all


class Shaper:
    """Shared response shaping for completions and chat."""

    object_full = object_chunk = ""
    return_token_ids = False  # vLLM's: token ids in each choice (completions)

    def __init__(self, token_text: P.TokenText, model: str, request_id: str, params,
                 top_n: int) -> None:
        self.token_text, self.id, self.params, self.top_n = token_text, request_id, params, top_n
        self.created = P.now()
        self.model = model
        self.states: dict[tuple[int, int], ChoiceState] = {}
        self.latest: dict[int, object] = {}  # prompt index -> its newest output
        self.prompt_lps_sent: set[int] = set()  # prompts whose stream carried prompt_logprobs

    def index(self, prompt_idx: int, child_idx: int) -> int:
        return prompt_idx * self.params.n + child_idx

    def token_counts(self, finals) -> tuple[int, int]:
        prompt = sum(len(f.prompt_token_ids) for f in finals if f is not None)
        generated = sum(len(c.token_ids) for f in finals if f is not None for c in f.outputs)
        return prompt, generated

    def usage(self, finals) -> dict:
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return P.usage(*self.token_counts(finals), cached)

    def chunk(self, choices: list, opts: P.StreamOptions) -> dict:
        out = {"id": self.id, "object": self.object_chunk, "created": self.created,
               "model": self.model, "choices": choices}
        if opts.continuous_usage_stats:
            out["usage"] = self.usage(list(self.latest.values()))
        elif opts.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, finals) -> dict:
        return {"id": self.id, "object": self.object_chunk, "created": self.created,
                "model": self.model, "choices": [], "usage": self.usage(finals)}

    def opening_chunks(self, opts):
        return []

    def delta_chunks(self, prompt_idx: int, out, opts):
        self.latest[prompt_idx] = out
        for c in out.outputs:
            state = self.states.setdefault((prompt_idx, c.index), ChoiceState())
            if state.done:
                continue
            first = state.sent_tokens
            delta, new_tokens = state.advance(c)
            reason = P.finish_reason(c) if c.finished else None
            if reason is not None:
                state.done = True
            wants_tokens = self.params.logprobs is not None or self.return_token_ids
            if not delta and reason is None and not (wants_tokens and new_tokens):
                continue
            choice = self.delta_choice(self.index(prompt_idx, c.index), c, delta, first, reason,
                                       out, state)
            if choice is not None:
                chunk = self.chunk([choice], opts)
                if (self.wants_prompt_logprobs() and out.prompt_logprobs is not None
                        and prompt_idx not in self.prompt_lps_sent):
                    # once per prompt, on its first chunk (the prompt is computed by then)
                    self.prompt_lps_sent.add(prompt_idx)
                    self.add_prompt_logprobs(chunk, choice, out)
                yield chunk, new_tokens

    def wants_prompt_logprobs(self) -> bool:
        return False

    def add_prompt_logprobs(self, chunk: dict, choice: dict, out) -> None:
        """vLLM's prompt_logprobs where the full response has them (per choice or top level)."""


class CompletionShaper(Shaper):
    object_full = object_chunk = "text_completion"

    def __init__(self, token_text, model, request_id, params, echo: bool,
                 prompt_logprobs: bool = False, return_token_ids: bool = False) -> None:
        super().__init__(token_text, model, request_id, params, params.logprobs or 0)
        self.echo, self.prompt_logprobs = echo, prompt_logprobs
        self.return_token_ids = return_token_ids

    def wants_prompt_logprobs(self) -> bool:
        return self.prompt_logprobs

    def add_prompt_logprobs(self, chunk: dict, choice: dict, out) -> None:
        choice["prompt_logprobs"] = P.vllm_prompt_logprobs(out.prompt_logprobs)

    def prompt_text(self, out) -> str:
        if out.prompt is not None:
            return out.prompt
        return self.token_text.tokenizer.decode(out.prompt_token_ids)

    def logprobs(self, c, start: int, offset: int):
        if self.params.logprobs is None:
            return None
        return P.completion_logprobs(self.token_text, c.token_ids[start:],
                                     c.logprobs[start:], self.top_n, offset)

    def with_echo(self, logprobs: dict | None, out) -> dict | None:
        """Completion logprobs with the echoed prompt's tokens in front."""
        if logprobs is None:
            return None
        head = P.echo_logprobs(self.token_text, out.prompt_token_ids, out.prompt_logprobs,
                               self.top_n)
        shift = sum(len(t) for t in head["tokens"])
        return {"tokens": head["tokens"] + logprobs["tokens"],
                "token_logprobs": head["token_logprobs"] + logprobs["token_logprobs"],
                "top_logprobs": head["top_logprobs"] + logprobs["top_logprobs"],
                "text_offset": head["text_offset"] + [o + shift for o in logprobs["text_offset"]]}

    def full_response(self, finals) -> dict:
        choices = []
        for p, f in enumerate(finals):
            prefix = self.prompt_text(f) if self.echo else ""
            for c in f.outputs:
                logprobs = self.logprobs(c, 0, len(prefix))
                if self.echo:
                    logprobs = self.with_echo(self.logprobs(c, 0, 0), f)
                choice = {"index": self.index(p, c.index), "text": prefix + c.text,
                          "logprobs": logprobs, "finish_reason": P.finish_reason(c),
                          "stop_reason": c.stop_reason}
                if self.prompt_logprobs:
                    choice["prompt_logprobs"] = P.vllm_prompt_logprobs(f.prompt_logprobs)
                if self.return_token_ids:
                    choice["prompt_token_ids"] = list(f.prompt_token_ids)
                    choice["token_ids"] = list(c.token_ids)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return {"id": self.id, "object": self.object_full, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(finals)}

    def delta_choice(self, index, c, delta, first, reason, out, state) -> dict:
        logprobs = self.logprobs(c, first, 0)
        if self.echo and not state.echoed:
            state.echoed = True
            delta = self.prompt_text(out) + delta
            logprobs = self.with_echo(logprobs, out)
        choice = {"index": index, "text": delta, "logprobs": logprobs,
                  "finish_reason": reason, "stop_reason": c.stop_reason if reason else None}
        if self.return_token_ids:
            if first == 0:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
            choice["token_ids"] = list(c.token_ids[first:state.sent_tokens])
        return choice


class ChatShaper(Shaper):
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    def __init__(self, token_text, model, request_id, params, top_n: int,
                 tools: P.ToolRequest | None = None) -> None:
        super().__init__(token_text, model, request_id, params, top_n)
        self.tools = tools
        self.parsers: dict[int, object] = {}  # choice index -> its tool-call parser

    def message(self, c) -> tuple[dict, str | None]:
        """A whole choice's message and finish reason (tool calls parsed out of its text)."""
        reason = P.finish_reason(c)
        if self.tools is None:
            return {"role": "assistant", "content": c.text}, reason
        content, calls = parse_all(self.tools.parser(), c.text)
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        return message, _tool_reason(reason, bool(calls))

    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def add_prompt_logprobs(self, chunk: dict, choice: dict, out) -> None:
        chunk["prompt_logprobs"] = P.vllm_prompt_logprobs(out.prompt_logprobs)  # top level

    def logprobs(self, c, start: int):
        if self.params.logprobs is None:
            return None
        return P.chat_logprobs(self.token_text, c.token_ids[start:], c.logprobs[start:],
                               self.top_n)

    def full_response(self, finals) -> dict:
        f = finals[0]
        choices = []
        for c in f.outputs:
            message, reason = self.message(c)
            choices.append({"index": c.index, "message": message,
                            "logprobs": self.logprobs(c, 0), "finish_reason": reason,
                            "stop_reason": c.stop_reason})
        out = {"id": self.id, "object": self.object_full, "created": self.created,
               "model": self.model, "choices": choices, "usage": self.usage(finals)}
        if self.params.prompt_logprobs is not None:  # vLLM: top level on chat
            out["prompt_logprobs"] = P.vllm_prompt_logprobs(f.prompt_logprobs)
        return out

    def opening_chunks(self, opts):
        # OpenAI sends the role first, in its own chunk per choice.
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}], opts)
                for i in range(self.params.n)]

    def delta_choice(self, index, c, delta, first, reason, out, state) -> dict | None:
        logprobs = self.logprobs(c, first)
        if self.tools is None:
            return {"index": index, "delta": {"content": delta} if delta else {},
                    "logprobs": logprobs, "finish_reason": reason}
        parser = self.parsers.setdefault(index, self.tools.parser())
        parsed = parser.feed(delta)
        if reason is not None:
            parsed.extend(parser.finish())
            reason = _tool_reason(reason, bool(parser.calls))
        body = {}
        if parsed.content:
            body["content"] = parsed.content
        if parsed.tool_calls:
            body["tool_calls"] = parsed.tool_calls
        if not body and reason is None and logprobs is None:
            return None  # the parser holds this text back (a tag may be starting)
        return {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": reason}


def _tool_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a choice that ended by calling; "length" stays "length"."""
    return "tool_calls" if called and reason == "stop" else reason
