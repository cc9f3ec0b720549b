"""``kvserve generate``: offline generation and batch jobs.

Prompts on the command line (no ``--input``/``--output``): the completions are printed as
plain text, the first prompt's streamed as it is generated (``--format jsonl`` for the
batch lines instead). Batch jobs, OpenAI Batch API lines in and out:

Input: prompts on the command line, a text file (one prompt per line) or JSONL. A JSONL line is
either an OpenAI batch request ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}`` or a bare body (``{"prompt": ...}`` / ``{"messages": ...}``).
Output: one OpenAI batch output line per input line, ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``, written as each request finishes, so a
killed job keeps what it finished and ``--resume`` skips the custom_ids already written.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from engine import EngineConfig, LLMEngine, LoRARequest

from . import protocol as P
from .cli import add_engine_args, lora_modules, merge_settings
from .shaping import ChatShaper, CompletionShaper

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "stop",
                  "ignore_eos")


@dataclass
class Item:
    custom_id: str
    url: str = COMPLETIONS
    body: dict = field(default_factory=dict)
    error: dict | None = None  # set for lines that could not be read


@dataclass
class Job:
    item: Item
    shaper: object
    request_ids: list[str]
    finals: dict = field(default_factory=dict)
    failed: bool = False  # an error line was written already


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvserve generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", help="prompts (each one request)")
    p.add_argument("-i", "--input", help="text or JSONL file of requests; - for stdin")
    p.add_argument("-o", "--output", default="-", help="JSONL results; - for stdout (default)")
    p.add_argument("--resume", action="store_true", help="skip custom_ids already in --output")
    p.add_argument("--format", choices=["text", "jsonl"],
                   help="stdout: plain text (default for prompts on the command line) or "
                        "OpenAI batch lines (default with --input / --output)")
    p.add_argument("--raw", action="store_true",
                   help="send plain prompts as completions (default: chat template)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int)
    add_engine_args(p)
    p.add_argument("--lora-modules", nargs="+", metavar="NAME=PATH",
                   help="LoRA adapters: a line whose body.model is NAME runs on it")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--min-p", type=float)
    p.add_argument("--n", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    return p


# ---- input -----------------------------------------------------------------------------
def read_items(args) -> Iterator[Item]:
    for i, prompt in enumerate(args.prompts):
        yield text_item(f"prompt-{i}", prompt, args.raw)
    if args.input:
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        jsonl = args.input.endswith((".jsonl", ".json"))
        try:
            for n, line in enumerate(stream):
                if line.strip():
                    yield parse_line(n, line, jsonl, args.raw)
        finally:
            if stream is not sys.stdin:
                stream.close()


def text_item(custom_id: str, prompt: str, raw: bool) -> Item:
    if raw:
        return Item(custom_id, COMPLETIONS, {"prompt": prompt})
    return Item(custom_id, CHAT, {"messages": [{"role": "user", "content": prompt}]})


def parse_line(n: int, line: str, jsonl: bool, raw: bool) -> Item:
    line = line.rstrip("\n")
    if not jsonl and not line.lstrip().startswith("{"):
        return text_item(f"line-{n}", line, raw)
    try:
        obj = json.loads(line)
    except ValueError as e:
        return Item(f"line-{n}", error={"code": "invalid_json", "message": f"line {n + 1}: {e}"})
    if not isinstance(obj, dict):
        return Item(f"line-{n}", error={"code": "invalid_request",
                                        "message": f"line {n + 1}: not a JSON object"})
    custom_id = str(obj.get("custom_id", f"line-{n}"))
    if "body" not in obj:  # a bare request body
        return Item(custom_id, CHAT if "messages" in obj else COMPLETIONS, obj)
    url, method = obj.get("url"), obj.get("method", "POST")
    if url not in (CHAT, COMPLETIONS) or method != "POST" or not isinstance(obj["body"], dict):
        return Item(custom_id, error={"code": "invalid_request", "message":
                    f"line {n + 1}: need method POST, url {CHAT} or {COMPLETIONS}, object body"})
    return Item(custom_id, url, obj["body"])


# ---- output ----------------------------------------------------------------------------
class Writer:
    def __init__(self, path: str, resume: bool) -> None:
        self.done: set[str] = set()
        if path == "-":
            self.file = sys.stdout
            return
        if resume and os.path.exists(path):
            self.done = _finished_ids(path)
            self.file = open(path, "a", encoding="utf-8")
        else:
            self.file = open(path, "w", encoding="utf-8")

    def write(self, custom_id: str, status: int | None, body: dict | None, request_id: str | None,
              error: dict | None = None) -> None:
        response = None if status is None else {"status_code": status, "request_id": request_id,
                                                "body": body}
        line = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id,
                "response": response, "error": error}
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not sys.stdout:
            self.file.close()


def _finished_ids(path: str) -> set[str]:
    """custom_ids in an earlier output; a torn last line (job killed mid-write) is cut off."""
    with open(path, "rb") as f:
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with open(path, "wb") as f:
            f.write(complete)
    done = set()
    for line in complete.splitlines():
        try:
            done.add(json.loads(line)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


# ---- the job ---------------------------------------------------------------------------
class BatchRunner:
    def __init__(self, engine: LLMEngine, writer: Writer, defaults: dict, model_name: str,
                 progress, loras: dict | None = None) -> None:
        self.engine, self.writer, self.defaults = engine, writer, defaults
        # adapter name -> LoRARequest; a line's body.model picks one (any other name: the
        # base model, as batch files often name a hosted model)
        self.loras = loras or {}
        self.model_name, self.progress = model_name, progress
        self.token_text = P.TokenText(engine.tokenizer)
        self.jobs: dict[str, Job] = {}  # engine request id -> its job
        self.window = 4 * engine.config.max_num_seqs  # requests tokenized ahead of the engine
        self.generated, self.start = 0, time.perf_counter()

    def run(self, items) -> None:
        for item in items:
            if item.custom_id in self.writer.done:
                continue
            self.submit(item)
            while len(self.jobs) >= self.window:
                self.step()
        while self.jobs:
            self.step()

    def submit(self, item: Item) -> None:
        if item.error is not None:
            self.finish_line(item.custom_id, None, None, None, item.error)
            return
        rid = P.new_id("batch")
        try:
            body = {**self.defaults, **item.body}
            lora = self.loras.get(body.get("model")) if isinstance(body.get("model"), str) \
                else None
            name = self.model_name if lora is None else lora.lora_name
            try:
                self.engine.resolve_lora(lora)
            except ValueError as e:
                raise P.bad_field("model", str(e)) from e
            if item.url == CHAT:
                req = P.parse_chat(body, self.engine.tokenizer,
                                   max_chars=self.engine.max_prompt_chars)
                shaper = ChatShaper(self.token_text, name, rid, req.params,
                                    req.params.logprobs or 0, req.tools)
            else:
                req = P.parse_completion(body)
                shaper = CompletionShaper(self.token_text, name, rid, req.params, req.echo,
                                          req.prompt_logprobs)
            checked = [self._validate(i, p, req) for i, p in enumerate(req.prompts)]
        except P.APIError as e:
            self.finish_line(item.custom_id, e.status, e.body(), rid)
            return
        job = Job(item, shaper, [f"{rid}-{i}" for i in range(len(checked))])
        for request_id, prompt in zip(job.request_ids, checked):
            self.engine.add_request(request_id, prompt, req.params, lora_request=lora)
            self.jobs[request_id] = job

    def _validate(self, i: int, prompt, req: P.ParsedRequest) -> dict:
        name = "messages" if callable(prompt) else "prompt"
        try:
            self.engine.check_params(req.params)
            text, ids = self.engine.tokenize(prompt() if callable(prompt) else prompt)
            self.engine.validate_prompt(ids)
        except ValueError as e:
            raise P.bad_field(name if len(req.prompts) == 1 else f"{name}[{i}]", str(e)) from e
        return {"prompt": text, "prompt_token_ids": ids}

    def step(self) -> None:
        for out in self.engine.step():
            if not out.finished:
                continue
            job = self.jobs.pop(out.request_id)
            job.finals[out.request_id] = out
            self.generated += sum(len(c.token_ids) for c in out.outputs)
            if out.error is not None and not job.failed:
                job.failed = True  # its other prompts still finish; the line is an error
                self.finish_line(job.item.custom_id, 500, P.APIError(
                    500, f"request failed inside the engine: {out.error}", "internal_error").body(),
                    job.shaper.id)
            if len(job.finals) == len(job.request_ids) and not job.failed:
                finals = [job.finals[r] for r in job.request_ids]
                self.finish_line(job.item.custom_id, 200, job.shaper.full_response(finals),
                                 job.shaper.id)

    def finish_line(self, custom_id, status, body, request_id, error=None) -> None:
        self.writer.write(custom_id, status, body, request_id, error)
        if self.progress is not None:
            self.progress.update(1)
            rate = self.generated / max(time.perf_counter() - self.start, 1e-9)
            self.progress.set_postfix_str(f"{rate:.1f} tok/s")


def _text_mode(args) -> bool:
    if args.format is not None:
        return args.format == "text"
    return args.input is None and args.output == "-" and not args.resume


class TextPrinter:
    """Plain text on stdout, in prompt order: each prompt's completions as they are
    generated (all prompts run together; a prompt's text is printed once the ones before it
    are done, what it has so far at once, then the rest live). n > 1: one after another."""

    def __init__(self, engine: LLMEngine, defaults: dict, out) -> None:
        self.engine, self.defaults, self.out = engine, defaults, out

    def run(self, items: list[Item]) -> int:
        ids = []
        try:
            for i, item in enumerate(items):
                body = {**self.defaults, **item.body}
                req = (P.parse_chat(body, self.engine.tokenizer) if item.url == CHAT
                       else P.parse_completion(body))
                prompt = req.prompts[0]
                self.engine.add_request(f"gen-{i}", prompt() if callable(prompt) else prompt,
                                        req.params)
                ids.append(f"gen-{i}")
        except (P.APIError, ValueError) as e:
            self.engine.abort_request(ids)
            print(f"kvserve generate: {e}", file=sys.stderr)
            return 2
        latest: dict = {}
        shown, current = 0, 0  # characters of ids[current] printed so far
        while current < len(ids) and self.engine.has_unfinished_requests() | bool(latest):
            for out in self.engine.step():
                latest[out.request_id] = out
            while current < len(ids) and ids[current] in latest:
                out = latest[ids[current]]
                texts = [c.text for c in out.outputs]
                text = "\n\n".join(texts) if len(texts) > 1 else texts[0]
                if len(texts) == 1 or out.finished:
                    self.out.write(text[shown:])
                    self.out.flush()
                    shown = len(text)
                if not out.finished:
                    break
                if out.error is not None:
                    print(f"kvserve: {ids[current]} failed: {out.error}", file=sys.stderr)
                self.out.write("\n")
                current, shown = current + 1, 0
        return 0


def _count_lines(args) -> int | None:
    if args.input in (None, "-"):
        return len(args.prompts) if args.input is None else None
    with open(args.input, "rb") as f:
        return len(args.prompts) + sum(1 for line in f if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompts and not args.input:
        parser.error("give prompts, or --input FILE (- for stdin)")
    engine_kwargs, _ = merge_settings(parser, args, ("lora_modules",))
    loras = {name: LoRARequest(name, i, path)
             for i, (name, path) in enumerate(lora_modules(args.lora_modules).items(), start=1)}
    if loras:
        engine_kwargs["enable_lora"] = True
    if args.seed is not None:
        engine_kwargs["seed"] = args.seed
    defaults = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    engine = LLMEngine(EngineConfig(**engine_kwargs))
    for lora in loras.values():  # a bad adapter stops the job before it starts
        engine.resolve_lora(lora)
    if _text_mode(args):
        return TextPrinter(engine, defaults, sys.stdout).run(list(read_items(args)))
    writer = Writer(args.output, args.resume)
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=_count_lines(args), desc="Batch", unit="req", file=sys.stderr,
                        initial=0, dynamic_ncols=True)
    model_name = os.path.basename(os.path.normpath(args.model)) if args.model else "SmolLM2-135M-Instruct"
    try:
        BatchRunner(engine, writer, defaults, model_name, progress, loras).run(read_items(args))
    finally:
        writer.close()
        if progress is not None:
            progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
