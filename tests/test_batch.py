"""`kvserve generate`: OpenAI batch lines in and out, bad lines, --resume, clean stdout."""
from __future__ import annotations

import json
import subprocess
import sys

import jsonschema

from conftest import assert_no_leak
from engine import SamplingParams
from server.batch import BatchRunner, Writer, build_parser, read_items


def batch_line(custom_id, url, body):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def write_input(path, over_length: int):
    lines = [
        batch_line("chat-1", "/v1/chat/completions", {
            "model": "gpt-4o-mini", "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
        batch_line("comp-1", "/v1/completions", {"prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0}),
        '{"custom_id": "broken", "method": "POST", "url": ',
        batch_line("too-long", "/v1/completions", {"prompt": [5] * over_length, "max_tokens": 4}),
        batch_line("comp-2", "/v1/completions", {"prompt": ["a b c", "x y z"], "max_tokens": 4,
                                                 "temperature": 0}),
        batch_line("bad-url", "/v1/embeddings", {"input": "x"}),
    ]
    path.write_text("\n".join(lines) + "\n")


def run_batch(llm, in_path, out_path, resume=False):
    args = build_parser().parse_args(["--input", str(in_path), "--output", str(out_path)]
                                     + (["--resume"] if resume else []))
    writer = Writer(args.output, args.resume)
    try:
        BatchRunner(llm.engine, writer, {}, "SmolLM2-135M-Instruct", None).run(read_items(args))
    finally:
        writer.close()
    return [json.loads(line) for line in out_path.read_text().splitlines()]


def test_batch_lines_good_and_bad(smol_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, smol_llm.engine.max_model_len + 1)
    lines = {r["custom_id"]: r for r in run_batch(smol_llm, inp, out)}
    assert set(lines) == {"chat-1", "comp-1", "line-2", "too-long", "comp-2", "bad-url"}
    for r in lines.values():
        assert set(r) == {"id", "custom_id", "response", "error"}
    chat = lines["chat-1"]["response"]
    assert chat["status_code"] == 200 and chat["body"]["object"] == "chat.completion"
    expected = smol_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    assert chat["body"]["choices"][0]["message"]["content"] == expected[0].outputs[0].text
    comp2 = lines["comp-2"]["response"]["body"]
    assert [c["index"] for c in comp2["choices"]] == [0, 1]
    assert lines["line-2"]["response"] is None and lines["line-2"]["error"]["code"] == "invalid_json"
    too_long = lines["too-long"]["response"]
    assert too_long["status_code"] == 400 and "max_model_len" in too_long["body"]["error"]["message"]
    assert lines["bad-url"]["error"]["code"] == "invalid_request"
    assert_no_leak(smol_llm.engine)


def test_resume_finishes_only_the_rest(smol_llm, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, smol_llm.engine.max_model_len + 1)
    full = run_batch(smol_llm, inp, out)
    kept = full[:2]
    # a job killed mid-write: two finished lines and a torn third one
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "batch_req_x", "cust')
    resumed = run_batch(smol_llm, inp, out, resume=True)
    ids = [r["custom_id"] for r in resumed]
    assert sorted(ids) == sorted(r["custom_id"] for r in full)  # each exactly once
    assert resumed[:2] == kept  # the finished lines were not redone


def test_cli_stdout_is_clean_jsonl(smol_llm, tmp_path):
    inp = tmp_path / "prompts.txt"
    inp.write_text("Name a color.\nName a fruit.\n")
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--input", str(inp),
                           "--output", "-", "--max-tokens", "6", "--temperature", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["custom_id"] for r in lines] == ["line-0", "line-1"]
    assert all(r["response"]["status_code"] == 200 for r in lines)
    assert "Batch" in proc.stderr and "tok/s" in proc.stderr  # the progress bar


def test_cli_prompts_print_plain_text(smol_llm):
    prompts = ["Name a color.", "Name a fruit."]
    proc = subprocess.run([sys.executable, "-m", "server.cli", "generate", *prompts,
                           "--max-tokens", "8", "--temperature", "0", "--dtype", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = [smol_llm.chat([{"role": "user", "content": p}],
                              SamplingParams(temperature=0.0, max_tokens=8),
                              use_tqdm=False)[0].outputs[0].text for p in prompts]
    assert proc.stdout == "".join(t + "\n" for t in expected)
    jsonl = subprocess.run([sys.executable, "-m", "server.cli", "generate", prompts[0],
                            "--max-tokens", "8", "--temperature", "0", "--format", "jsonl",
                            "--no-progress", "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    line = json.loads(jsonl.stdout)
    assert line["response"]["body"]["choices"][0]["message"]["content"] == expected[0]
    bad = subprocess.run([sys.executable, "-m", "server.cli", "generate", "hi", "--n", "500"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "n must be" in bad.stderr


def test_batch_lines_with_response_format_and_tools(smol_llm, tmp_path):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 20}},
              "required": ["answer"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": schema}}
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join([
        batch_line("json", "/v1/chat/completions", {
            "messages": ask, "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}),
        batch_line("tool", "/v1/chat/completions", {
            "messages": ask, "max_tokens": 40, "temperature": 0, "tools": [tool],
            "tool_choice": "required"}),
        batch_line("regex", "/v1/completions", {
            "prompt": "Code:", "max_tokens": 10, "structured_outputs": {"regex": r"[0-9]{3}"}}),
    ]) + "\n")
    lines = {r["custom_id"]: r["response"]["body"] for r in run_batch(smol_llm, inp, out)}
    jsonschema.validate(json.loads(lines["json"]["choices"][0]["message"]["content"]), schema)
    call = lines["tool"]["choices"][0]
    assert call["finish_reason"] == "tool_calls"
    assert call["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    jsonschema.validate(json.loads(call["message"]["tool_calls"][0]["function"]["arguments"]),
                        schema)
    assert len(lines["regex"]["choices"][0]["text"]) == 3
    assert lines["regex"]["choices"][0]["text"].isdigit()
    assert_no_leak(smol_llm.engine)
